"""`edgeq bench qcnn`: Q-CNN (k-means and error-corrected) against float and int8 onnxruntime, side by side.

Three models: the reference edge and cloud CNNs (held-out MNIST accuracy) and a wide
random fully connected layer (output error vs float only). For each, four
files are built in a temporary directory (float, int8 QDQ, Q-CNN k-means,
Q-CNN EC) and five variants measured for file size, accuracy, output error
and latency (batch 1 and 32, threads 1 and all): the Q-CNN files run on the
numba float-table kernels, and the EC file also on the native fast-scan
kernels ("Q-CNN EC native": 4-bit codes, 8-bit tables, SIMD shuffles).
A K x dsub sweep on the edge CNN is plotted as accuracy vs compression, and so is the size/accuracy
frontier over mixed settings (``FRONTIER``). Per-layer times of the native net and of float
onnxruntime explain the speed ratios (``qcnn_profile.py``).
Calibration uses the train split only; the test split is used for accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infra.bench.qcnn_profile import missed_note, native_layers, onnxruntime_nodes, profile_table
from infra.bench.qcnn_tables import (
    bench_notes,
    latency_table,
    layer_table,
    ratio_table,
    size_table,
    targets_table,
)
from infra.bench.report import machine_info, usable_cores, write_markdown
from infra.bench.sweep import FrontierPoint, SweepPoint, frontier_table, plot_frontier, plot_sweep, sweep_table
from infra.bench.timing import Latency, measure_interleaved

Progress = Callable[[str], None]

VARIANTS = ("float", "int8 QDQ", "Q-CNN k-means", "Q-CNN EC", "Q-CNN EC native", "Q-CNN EC native segments")
NATIVE = "Q-CNN EC native"
SEGMENTS = "Q-CNN EC native segments"
BATCHES = (1, 32)
EVAL_BATCH = 256
QCNN_KEYS = ("conv_k", "conv_dsub", "fc_k", "fc_dsub", "last_fc", "ec_iters", "codebook_dtype")  # shown in the notes
# The shipped models' settings (models/*.qcnn.onnx, chosen on the train split's last 1,000 images): the edge CNN
# >= 20x (CompressConfig's defaults give 17x); conv_dsub=8 halves the PQ convs' tables and scans.
EDGE_SETTINGS = {"conv_dsub": 8, "fc_k": 4, "fc_dsub": 4}
CLOUD_SETTINGS = {"conv_dsub": 8}
# Mixed settings of the edge CNN for the size/accuracy frontier (name, CompressConfig fields).
FRONTIER = (
    ("defaults (conv K16 d4, FC K8 d8)", {}),
    ("FC K4 d4", {"fc_k": 4, "fc_dsub": 4}),
    ("conv d8, FC K4 d4 (shipped)", EDGE_SETTINGS),
    ("FC K4 d8", {"fc_k": 4, "fc_dsub": 8}),
    ("FC K4 d4, conv K8", {"fc_k": 4, "fc_dsub": 4, "conv_k": 8}),
    ("FC K4 d8, conv K8", {"fc_k": 4, "fc_dsub": 8, "conv_k": 8}),
    ("FC K16 d8", {"fc_k": 16}),
    ("FC K4 d16", {"fc_k": 4, "fc_dsub": 16}),
)


@dataclass
class QcnnBenchConfig:
    """Settings of one `edgeq bench qcnn` run (defaults: the full run, under ~10 min on 2 cores)."""

    data_dir: str = "data/mnist"
    model: str = "models/edge_cnn.onnx"
    cloud_model: str = "models/cloud_cnn.onnx"
    out_dir: str = "docs/results"
    repeats: int = 200  # timed calls per latency cell
    max_seconds: float = 3.0  # per latency cell: stop early past this (at least 5 calls)
    calib_images: int = 512  # train images for int8 calibration and Q-CNN (k-means on responses, EC)
    eval_images: int | None = None  # held-out test images for accuracy; None = the whole split
    # The wide FC is wide_dim -> wide_dim (4096 as the issue asks). Compressing it took 24.5 s (k-means)
    # and 32.0 s (EC) on 2 cores, thanks to CompressConfig's wide-layer settings (wide_subspaces etc.).
    wide_dim: int = 4096
    wide_eval: int = 256  # random inputs for the wide FC output error
    sweep: bool = True
    sweep_k: tuple[int, ...] = (8, 16, 32, 64, 128)  # K > 128 cannot apply to the 128-output FC
    sweep_dsub: tuple[int, ...] = (4, 8)
    frontier: bool = True
    profile_repeats: int = 50  # calls per per-layer profile
    threads: tuple[int, ...] = field(default_factory=lambda: tuple(sorted({1, usable_cores()})))
    seed: int = 0

    @classmethod
    def quick(cls, **kw) -> QcnnBenchConfig:
        """Few repeats, small calibration and sweep, a 256-wide FC: for tests and CI."""
        base = {"repeats": 10, "max_seconds": 0.5, "calib_images": 64, "eval_images": 1000, "wide_dim": 256,
                "wide_eval": 64, "sweep_k": (8, 32), "sweep_dsub": (8,), "frontier": False, "profile_repeats": 5}
        base.update(kw)
        return cls(**base)


@dataclass
class Variant:
    """One built model. key: runtime key for load_runtime; path: its file."""

    name: str
    key: str
    path: Path
    file_bytes: int
    build_s: float = 0.0
    accuracy: float | None = None  # top-1 in [0, 1] on the held-out split; None for random-weight models
    rel_error: float | None = None  # ||y - y_float|| / ||y_float|| on the eval inputs
    latency: dict[tuple[int, int], Latency] = field(default_factory=dict)  # (batch, threads) -> Latency
    report: object | None = None  # CompressReport for Q-CNN variants (not repeated on the native row)
    options: dict = field(default_factory=dict)  # extra load_runtime options (the Q-CNN kernels)
    top1: np.ndarray | None = None  # int [n_eval] predicted class per eval input


@dataclass
class Case:
    """A model to benchmark. x_*: float32 model inputs; labels None when accuracy is meaningless."""

    name: str
    path: Path
    calib: np.ndarray
    x_eval: np.ndarray
    labels: np.ndarray | None
    qcnn_overrides: dict = field(default_factory=dict)  # CompressConfig fields for this model
    variants: list[Variant] = field(default_factory=list)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = QcnnBenchConfig()
    p.add_argument("--quick", action="store_true", help="few repeats, small sweep, 256-wide FC (tests, CI)")
    p.add_argument("--repeats", type=int, help=f"timed calls per latency cell (default {d.repeats}, quick 10)")
    p.add_argument("--out-dir", help=f"where to write qcnn.md and qcnn_sweep.png (default {d.out_dir})")
    p.add_argument("--data-dir", help=f"MNIST IDX directory (default {d.data_dir})")
    p.add_argument("--model", help=f"reference edge CNN (default {d.model})")
    p.add_argument("--calib-images", type=int,
                   help=f"train images for calibration (default {d.calib_images}, quick 64)")
    p.add_argument("--skip-sweep", action="store_true", help="skip the K x dsub sweep and its plot")
    p.add_argument("--sweep-k", type=_ints, help=f"comma-separated K values (default {_csv(d.sweep_k)})")
    p.add_argument("--sweep-dsub", type=_ints, help=f"comma-separated dsub values (default {_csv(d.sweep_dsub)})")
    p.add_argument("--wide-dim", type=int, help=f"the wide FC layer is D -> D (default {d.wide_dim}, quick 256)")
    p.add_argument("--seed", type=int,
                   help=f"seed for calibration sampling, random models and k-means (default {d.seed})")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


OPTIONS = ("repeats", "out_dir", "data_dir", "model", "calib_images", "seed", "sweep_k", "sweep_dsub", "wide_dim")


def config_from_args(args: argparse.Namespace) -> QcnnBenchConfig:
    given = {k: getattr(args, k, None) for k in OPTIONS}
    given = {k: v for k, v in given.items() if v is not None}
    if getattr(args, "skip_sweep", False):
        given["sweep"] = given["frontier"] = False
    cfg = QcnnBenchConfig.quick(**given) if args.quick else QcnnBenchConfig(**given)
    if min(cfg.repeats, cfg.calib_images, cfg.wide_dim) < 1:
        raise ValueError(f"--repeats, --calib-images and --wide-dim must be >= 1, "
                         f"got {cfg.repeats}, {cfg.calib_images}, {cfg.wide_dim}")
    return cfg


def command_line(args: argparse.Namespace) -> str:
    """The `edgeq bench qcnn ...` command equivalent to `args` (options given, in a fixed order)."""
    words = ["edgeq", "bench", "qcnn"] + (["--quick"] if args.quick else [])
    for opt in OPTIONS:
        value = getattr(args, opt, None)
        if value is not None:
            words += ["--" + opt.replace("_", "-"), _csv(value) if isinstance(value, tuple) else str(value)]
    return shlex.join(words + (["--skip-sweep"] if args.skip_sweep else []))


def run(args: argparse.Namespace, progress: Progress) -> str:
    cfg = config_from_args(args)
    # The variants' timings alternate (measure_interleaved): numba's OpenMP workers must not spin between their
    # calls, taking a core from the next variant. Read when numba first starts its threads, i.e. later than this.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return run_bench(cfg, progress, command_line(args))


# --- building and measuring -------------------------------------------------------------------------


def qcnn_config(cfg: QcnnBenchConfig, error_correction: bool, **overrides):
    """The compressor's default CompressConfig with this run's calibration size, seed and threads."""
    from edge_workers.qcnn.compress import CompressConfig

    base = CompressConfig(error_correction=error_correction, calib_images=cfg.calib_images, seed=cfg.seed,
                          threads=max(cfg.threads))
    return dataclasses.replace(base, **overrides)


def compress(case: Case, out: Path, qcfg, progress: Progress):
    """Q-CNN compress `case`'s model to `out`; returns (CompressReport, seconds)."""
    from edge_workers.qcnn.compress import compress_model

    t0 = time.perf_counter()
    report = compress_model(str(case.path), str(out), case.calib, qcfg, progress=progress)
    return report, time.perf_counter() - t0


def build_variants(case: Case, cfg: QcnnBenchConfig, tmp: Path, progress: Progress) -> None:
    from infra.bench.models import quantize_int8_qdq

    case.variants.append(Variant("float", "onnx", case.path, case.path.stat().st_size))
    progress(f"[bench qcnn] {case.name}: int8 QDQ static quantization ({len(case.calib)} calibration inputs)")
    t0 = time.perf_counter()
    int8 = tmp / f"{case.path.stem}.int8.onnx"
    quantize_int8_qdq(case.path, int8, case.calib)
    case.variants.append(Variant("int8 QDQ", "onnx", int8, int8.stat().st_size, time.perf_counter() - t0))
    for name, ec in (("Q-CNN k-means", False), ("Q-CNN EC", True)):
        progress(f"[bench qcnn] {case.name}: {name} compression")
        out = tmp / f"{case.path.stem}.{'ec' if ec else 'kmeans'}.qcnn"
        report, secs = compress(case, out, qcnn_config(cfg, ec, **case.qcnn_overrides), progress)
        case.variants.append(Variant(name, "qcnn", out, out.stat().st_size, secs, report=report,
                                     options={"kernels": "numba"}))
    ec_file = case.variants[-1]  # the same file on the native fast-scan kernels (every layer: K <= 16)
    case.variants.append(Variant(NATIVE, "qcnn", ec_file.path, ec_file.file_bytes, options={"kernels": "native"}))
    case.variants.append(Variant(SEGMENTS, "qcnn", ec_file.path, ec_file.file_bytes,
                                 options={"kernels": "native", "mode": "segments"}))


def evaluate(case: Case, threads: int, progress: Progress) -> None:
    """Accuracy (when labelled) and output error vs float of every variant, on case.x_eval."""
    from edge_workers.runtime import load_runtime
    from infra.bench.models import predict_batched, relative_error

    ref = None
    for v in case.variants:
        rt = load_runtime(v.key, v.path, threads=threads, **v.options)
        rt.warmup()
        y = predict_batched(rt.predict, case.x_eval, EVAL_BATCH)
        ref = y if ref is None else ref
        v.top1 = y.argmax(axis=1)
        v.rel_error = relative_error(y, ref)
        if case.labels is not None:
            v.accuracy = float(np.mean(y.argmax(axis=1) == case.labels))
        acc = "n/a" if v.accuracy is None else f"{100 * v.accuracy:.2f} %"
        progress(f"[bench qcnn] {case.name} / {v.name}: accuracy {acc}, output rel. error {v.rel_error:.4f}")


def time_variants(case: Case, cfg: QcnnBenchConfig, progress: Progress) -> None:
    """Latency of every variant at each batch size and thread count; variants interleaved per cell."""
    from edge_workers.runtime import load_runtime

    for batch in BATCHES:
        x = np.ascontiguousarray(np.resize(case.x_eval, (batch, *case.x_eval.shape[1:])))
        for threads in cfg.threads:
            calls = {}
            for v in case.variants:
                rt = load_runtime(v.key, v.path, threads=threads, **v.options)  # a fresh runtime: its own pools
                rt.warmup()
                calls[v.name] = functools.partial(rt.predict, x)
            lats = measure_interleaved(calls, cfg.repeats, block=50, warmup=3, max_seconds=cfg.max_seconds,
                                       pause_s=0.1)
            for v in case.variants:
                v.latency[batch, threads] = lat = lats[v.name]
                progress(f"[bench qcnn] {case.name} / {v.name}: batch {batch}, {threads} thread(s): "
                         f"median {lat.median_ms:.3f} ms over {lat.runs} runs")


def make_cases(cfg: QcnnBenchConfig, tmp: Path, progress: Progress) -> list[Case]:
    from infra.bench.models import build_wide_fc
    from modelstore.interface import to_input
    from publishers.datasets import load_mnist

    rng = np.random.default_rng(cfg.seed)
    train = load_mnist(cfg.data_dir, "train")
    test = load_mnist(cfg.data_dir, "test")
    if cfg.calib_images > len(train):
        raise ValueError(f"--calib-images {cfg.calib_images} exceeds the {len(train)} train images")
    calib = to_input(train.images[rng.permutation(len(train))[: cfg.calib_images]])
    n_eval = len(test) if cfg.eval_images is None else min(cfg.eval_images, len(test))
    x_test, y_test = to_input(test.images[:n_eval]), test.labels[:n_eval].astype(np.int64)
    edge = Case("edge CNN", Path(cfg.model), calib, x_test, y_test, qcnn_overrides=dict(EDGE_SETTINGS))
    cloud = Case("cloud CNN", Path(cfg.cloud_model), calib, x_test, y_test, qcnn_overrides=dict(CLOUD_SETTINGS))
    wide_path = tmp / "wide_fc.onnx"
    progress(f"[bench qcnn] building the wide FC model {cfg.wide_dim}->{cfg.wide_dim} (random weights)")
    build_wide_fc(wide_path, cfg.wide_dim, cfg.wide_dim, seed=cfg.seed)
    d = cfg.wide_dim
    # At least 2 D calibration inputs: EC's least squares over D input dims needs more rows than D.
    wide = Case(f"wide FC {d}->{d}", wide_path,
                rng.standard_normal((max(cfg.calib_images, 2 * d), d), dtype=np.float32),
                rng.standard_normal((cfg.wide_eval, d), dtype=np.float32), None,
                qcnn_overrides={"last_fc": "pq", "fc_k": 16})  # its only layer is the last FC: quantize it too;
    # K = 16: 4-bit codes, the fast-scan kernels' format (the issue's 4096 -> 4096, K = 16 layer)
    return [edge, cloud, wide]


def run_sweep(case: Case, cfg: QcnnBenchConfig, tmp: Path, progress: Progress) -> list[SweepPoint]:
    """Compress the edge CNN for every (K, dsub), with and without EC; accuracy on case.x_eval."""
    from edge_workers.runtime import load_runtime
    from infra.bench.models import predict_batched

    points = []
    for k in cfg.sweep_k:
        for dsub in cfg.sweep_dsub:
            for ec in (False, True):
                progress(f"[bench qcnn] sweep: K={k} dsub={dsub} {'EC' if ec else 'k-means'}")
                out = tmp / f"sweep_k{k}_d{dsub}_{int(ec)}.qcnn"
                qcfg = qcnn_config(cfg, ec, conv_k=k, fc_k=k, conv_dsub=dsub, fc_dsub=dsub)
                compress(case, out, qcfg, lambda line: None)
                rt = load_runtime("qcnn", out, threads=max(cfg.threads))
                y = predict_batched(rt.predict, case.x_eval, EVAL_BATCH)
                acc = float(np.mean(y.argmax(axis=1) == case.labels))
                points.append(SweepPoint(k, dsub, ec, out.stat().st_size, acc))
    return points


def run_frontier(case: Case, cfg: QcnnBenchConfig, tmp: Path, progress: Progress) -> list[FrontierPoint]:
    """Compress the edge CNN (EC) with each of FRONTIER's settings; accuracy on case.x_eval (native kernels)."""
    from edge_workers.runtime import load_runtime
    from infra.bench.models import predict_batched

    points = []
    for i, (name, settings) in enumerate(FRONTIER):
        progress(f"[bench qcnn] frontier: {name}")
        out = tmp / f"frontier_{i}.qcnn"
        compress(case, out, qcnn_config(cfg, True, **settings), lambda line: None)
        y = predict_batched(load_runtime("qcnn", out, threads=max(cfg.threads)).predict, case.x_eval, EVAL_BATCH)
        points.append(FrontierPoint(name, out.stat().st_size, float(np.mean(y.argmax(axis=1) == case.labels))))
    return points


def profile_rows(cases: list[Case], cfg: QcnnBenchConfig) -> list:
    """Per-layer times (one thread) of the native net and of float onnxruntime, for the CNN cases, batches 1 and 32."""
    from edge_workers.runtime import load_runtime

    rows = []
    for case in (c for c in cases if c.labels is not None):
        native = next(v for v in case.variants if v.name == NATIVE)
        net = getattr(load_runtime("qcnn", native.path, threads=1, **native.options)._run, "net", None)
        for batch in BATCHES:
            x = np.ascontiguousarray(np.resize(case.x_eval, (batch, *case.x_eval.shape[1:])))
            if net is not None:
                rows.append((case.name, batch, NATIVE, native_layers(net, x, cfg.profile_repeats)))
            rows.append((case.name, batch, "float", onnxruntime_nodes(case.path, x, cfg.profile_repeats)))
    return rows


def _ec(case: Case) -> Variant:
    return next(v for v in case.variants if v.name == "Q-CNN EC")


def _native_path() -> str:
    from edge_workers.qcnn.fastscan import paths

    return f"path {paths()[0]}" if paths() else "NOT BUILT"


def run_bench(cfg: QcnnBenchConfig, progress: Progress, command: str) -> str:
    """Run everything, write qcnn.md (and qcnn_sweep.png, qcnn_frontier.png); returns the text for stdout."""
    t_start = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeq-bench-qcnn-") as tmp_name:
        tmp = Path(tmp_name)
        cases = make_cases(cfg, tmp, progress)
        for case in cases:
            build_variants(case, cfg, tmp, progress)
            evaluate(case, max(cfg.threads), progress)
            time_variants(case, cfg, progress)
        points = run_sweep(cases[0], cfg, tmp, progress) if cfg.sweep else []
        front = run_frontier(cases[0], cfg, tmp, progress) if cfg.frontier else []
        profiles = profile_rows(cases, cfg)
    tables = [targets_table(cases, cfg.threads, NATIVE), ratio_table(cases, cfg.threads, BATCHES, NATIVE),
              profile_table(profiles), size_table(cases), latency_table(cases, cfg.threads, BATCHES),
              layer_table(cases)]
    images = []
    if front:
        edge = cases[0]
        tables.append(frontier_table(front, edge.variants[0].file_bytes, edge.variants[0].accuracy))
        plot_frontier(out_dir / "qcnn_frontier.png", front, edge.variants[0].file_bytes, edge.variants[0].accuracy)
        images.append(("edge CNN: size/accuracy frontier over mixed settings", "qcnn_frontier.png"))
    if points:
        edge = cases[0]
        float_bytes = edge.variants[0].file_bytes
        tables.append(sweep_table(points, float_bytes, edge.variants[0].accuracy))
        refs = [(v.name, float_bytes / v.file_bytes, v.accuracy) for v in edge.variants]
        plot_sweep(out_dir / "qcnn_sweep.png", points, float_bytes, refs)
        images.append(("edge CNN: held-out accuracy vs compression ratio over K and dsub", "qcnn_sweep.png"))
    machine = machine_info()
    settings = ", ".join(f"{k}={_ec(cases[0]).report.config.get(k)}" for k in QCNN_KEYS)
    notes = bench_notes(cfg, cases, settings, NATIVE, SEGMENTS, _native_path(), time.perf_counter() - t_start)
    missed = missed_note(tables[0], profiles, NATIVE)
    if missed:
        notes.insert(0, missed)
    write_markdown(out_dir / "qcnn.md", "Q-CNN vs float and int8 onnxruntime", tables, machine, command,
                   intro="Produced by `edgeq bench qcnn` (infra/bench/qcnn.py); rerun the command below to refresh.",
                   notes=notes, images=images)
    progress(f"[bench qcnn] wrote {out_dir / 'qcnn.md'}" + "".join(f" and {out_dir / img}" for _, img in images))
    head = "\n".join(f"{k}: {v}" for k, v in machine.items())
    return "\n\n".join([head] + [t.text() for t in tables] + [notes[-1]])
