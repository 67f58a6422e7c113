"""Per-layer time of `edgeq bench qcnn`: the native net's layers (C timers) and onnxruntime's float nodes
(its profiler)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from infra.bench.report import Table

KIND_NAMES = {1: "conv", 2: "PQ conv", 3: "PQ FC", 4: "FC", 5: "relu", 6: "max pool"}


@dataclass(frozen=True)
class LayerTime:
    """One layer's time. us: microseconds per sample (median over calls)."""

    name: str
    us: float


def describe(layer: tuple, fused_pool: bool) -> str:
    """A native net layer (kind, sizes, arrays[, relu]) as text, e.g. 'conv 1->16 5x5 +relu +pool'."""
    from edge_workers.qcnn.native_net import GEOMETRY

    kind, g = layer[0], dict(zip(GEOMETRY, layer[1], strict=True))
    name = KIND_NAMES.get(kind, str(kind))
    if kind in (1, 2):
        name += f" {g['C']}->{g['C_out']} {g['kh']}x{g['kw']}"
    elif kind in (3, 4):
        name += f" {g['C']}->{g['C_out']}"
    elif kind == 6:
        name += f" {g['kh']}x{g['kw']}"
    if kind in (2, 3):
        name += f" (M={g['M']}, K={g['K']})"
    return name + (" +relu" if layer[3:] and layer[3] else "") + (" +pool" if fused_pool else "")


def native_layers(net, x: np.ndarray, repeats: int) -> list[LayerTime]:
    """Per-layer time of a NativeNet on x float32 [N, ...] (one thread); a pooling done by the conv before it
    (native/net.h fuses a 2 x 2 one) is shown as part of that conv."""
    us = net.profile(x, repeats)
    out = []
    for i, layer in enumerate(net.layers):
        fused = i + 1 < len(net.layers) and net.layers[i + 1][0] == 6 and us[i + 1] == 0 and layer[0] == 1
        if us[i] == 0 and i and layer[0] == 6 and out and out[-1].name.endswith("+pool"):
            continue
        out.append(LayerTime(describe(layer, fused), float(us[i])))
    return out


def onnxruntime_nodes(path, x: np.ndarray, repeats: int, threads: int = 1) -> list[LayerTime]:
    """Per-node time of a float ONNX model under onnxruntime's profiler (kernel time only, one thread)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(os.environ.get("TMPDIR", "/tmp"), "edgeq-qcnn-ort-profile")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {s.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)}
    for _ in range(3):
        s.run(None, feed)
    runs = max(1, repeats)
    for _ in range(runs):
        s.run(None, feed)
    prof = s.end_profiling()
    try:
        with open(prof) as f:
            events = json.load(f)
    finally:
        os.unlink(prof)
    per_node: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            node = ev["name"][: -len("_kernel_time")]
            op = ev.get("args", {}).get("op_name", "")
            per_node.setdefault(f"{op} ({node})" if op else node, []).append(float(ev["dur"]))
    out = []
    for node, durs in per_node.items():
        timed = durs[-runs:]  # the warm-up calls' events come first
        out.append(LayerTime(node, float(np.median(timed)) / len(x)))
    return out


def profile_table(rows: list[tuple[str, int, str, list[LayerTime]]]) -> Table:
    """rows: (model, batch, runtime, layer times) -> one table row per layer, with its share of the sum."""
    t = Table("Per-layer time (1 thread, µs per sample)", ["model", "batch", "runtime", "layer", "µs", "share %"],
              note="Q-CNN EC native: the native net's own timers around each layer (native/net.h: net_profile; "
                   "a layer's input transpose is part of it, a 2 x 2 pooling fused into the conv before it is "
                   "shown with that conv). float: onnxruntime's profiler, kernel time of each node after its graph "
                   "optimizations (Conv+Relu fused into NCHWc convs, named after their output; the profiler counts "
                   "whole microseconds, so batch-1 rows are coarse; session overhead is not in these rows). Medians "
                   "over the calls, divided by the batch.")
    for model, batch, runtime, layers in rows:
        total = sum(ly.us for ly in layers) or 1.0
        for ly in layers:
            t.add(model, batch, runtime, ly.name, f"{ly.us:.2f}", f"{100 * ly.us / total:.0f}")
        t.add(model, batch, runtime, "sum", f"{total:.2f}", "100")
    return t


def missed_note(targets, rows: list[tuple[str, int, str, list[LayerTime]]], native: str) -> str | None:
    """A note naming each missed speed target of `targets` (targets_table) with the per-layer times that explain it."""
    import re

    parts = []
    for what, measured, goal, met in targets.rows:
        m = re.match(r"(.+), batch (\d+), (\d+) thread", what)
        if met != "no" or not m:
            continue
        model, batch = m.group(1), int(m.group(2))
        times = {rt: layers for mo, b, rt, layers in rows if mo == model and b == batch}
        if native not in times or "float" not in times:
            parts.append(f"{what}: {measured} (goal {goal}).")
            continue
        nat, flt = times[native], times["float"]
        top = sorted(nat, key=lambda ly: -ly.us)[:2]
        big = max(flt, key=lambda ly: ly.us)
        parts.append(f"{what}: {measured} (goal {goal}). One thread, µs per sample: native net "
                     f"{sum(ly.us for ly in nat):.1f} (largest: " + ", ".join(f"{ly.name} {ly.us:.1f}" for ly in top)
                     + f") vs onnxruntime float kernels {sum(ly.us for ly in flt):.1f} (largest: {big.name} "
                     f"{big.us:.1f}) in the per-layer table.")
    return ("Missed: " + " ".join(parts)) if parts else None
