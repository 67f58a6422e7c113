"""`edgeq bench partition` pipeline modes: devices reach the broker through an emulated link; one run per mode.

The emulated hop is device -> broker (devices and the results subscriber connect through ``EmulatedLink``; the edge
and cloud actors connect to the broker directly, and the edge -> cloud hop is Ray on this host). It is the hop a
device split changes: raw 828-byte frames against a partition head's tensor frames. Modes:

- all-edge: pixel frames, policy edge-only (the edge answers every frame);
- all-cloud: pixel frames, policy cloud-only, codec raw;
- confidence: pixel frames, today's defaults (confidence routing, codec denoised);
- fixed split (one per candidate cut): the devices run the head and publish its tensor frames, the edge forwards
  them and the cloud tails answer (edge.partitions / cloud.partitions);
- planner: ``edge_workers.split_planner.plan`` on the measured profiles (device = lower tier, running the head;
  edge + cloud = upper) and the link's nominal figures picks the input (mapped to all-edge: the raw frame crosses
  and the first tier past the link answers) or a cut, which is then run as its own mode.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infra.bench.links import EmulatedLink, LinkSpec
from infra.bench.partition_report import (
    ALL_CLOUD,
    ALL_EDGE,
    BEST_FIXED,
    CONFIDENCE,
    PLANNER,
    ModeResult,
)

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "edge_cnn.onnx"
FIXED = "fixed"  # internal mode name of a fixed split (reported as BEST_FIXED for the best one)


@dataclass
class ModesConfig:
    """Settings of the pipeline modes (defaults: the full run)."""

    seconds: float = 10.0        # publishing time per mode
    rate: float = 100.0          # frames/s offered in total
    devices: int = 4
    cuts: tuple[str, ...] = ("pool2", "fc1")  # fixed-split candidates (cut points of edge_cnn)
    codec: str = "int8"          # tensor codec of the fixed splits
    drain_s: float = 30.0        # wait at most this long for the last answers
    warmup_s: float = 1.0        # each device's frames of the first seconds are left out of the latencies
    data_dir: str = "data/mnist"
    modes: tuple[str, ...] = (ALL_EDGE, ALL_CLOUD, CONFIDENCE, BEST_FIXED, PLANNER)


def prepare_partition(out_dir: Path, cuts, progress) -> tuple[dict, Path]:
    """Cut edge_cnn at `cuts` into out_dir and profile heads/tails on onnx at batch 1; (manifest, manifest path)."""
    import json

    from edge_workers.runtime import load_runtime
    from modelstore.partition_files import write_partition
    from modelstore.profiles import profile_partition

    progress(f"partition: cutting {MODEL.name} at {', '.join(cuts)}, profiling on onnx")
    manifest = write_partition(MODEL, out_dir, list(cuts))
    profile_partition(manifest, out_dir, MODEL, load_runtime, ["onnx"], [1], min_seconds=0.1)
    path = out_dir / f"{MODEL.stem}.partition.json"
    path.write_text(json.dumps(manifest, indent=1))
    return manifest, path


def plan_for(manifest: dict, spec: LinkSpec, codec: str):
    """The planner's choice for `spec`: (option, expected ms); OUTPUT (the device runs it all) is not a mode here."""
    from edge_workers.split_planner import OUTPUT, options_from_manifest, plan
    from modelstore.profiles import LinkProfile, TierProfile

    opts = [o for o in options_from_manifest(manifest, TierProfile("device", "onnx", 1),
                                             TierProfile("edge+cloud", "onnx", 1))
            if o.cut != OUTPUT and (o.codec == codec or o.cut == "input")]
    p = plan(opts, LinkProfile(spec.name, spec.rate_bps, 2e3 * spec.delay_s))
    return p.option, p.latency_ms


def _head_file(part_dir: Path, cut: str) -> Path:
    return part_dir / f"{MODEL.stem}@{cut}.head.onnx"


def run_mode(mode: str, spec: LinkSpec, broker, mqtt_cfg, cfg: ModesConfig, part_dir: Path, manifest_path: Path,
             progress, cut: str | None = None, tag: str = "") -> ModeResult:
    """One mode on one link: start the tiers, publish cfg.rate frames/s for cfg.seconds through the link."""
    import dataclasses

    from cloud_workers.config import CloudConfig, RayConfig
    from edge_workers.config import EdgeConfig
    from infra import cluster
    from infra.bench.loadgen import ProcessTree
    from infra.bench.pipeline_phases import _edge_counts
    from infra.collector import ResultCollector
    from publishers.config import PublishConfig
    from publishers.run import publish

    edge_kw = {"edge-only": {"policy": "edge-only"}, ALL_EDGE: {"policy": "edge-only"},
               ALL_CLOUD: {"policy": "cloud-only", "codec": "raw"}, CONFIDENCE: {}, FIXED: {}}[mode]
    ray_cfg = RayConfig(namespace=f"edgeq-bench-partition-{mode}-{spec.name}{tag}"[:60])
    pub_kw = {}
    if cut is not None:
        pub_kw = {"head": str(_head_file(part_dir, cut)), "tensor_codec": cfg.codec}
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(EmulatedLink.from_spec(spec, (broker.host, broker.port)))
        via = dataclasses.replace(mqtt_cfg, host=link.address[0], port=link.address[1])
        cloud = cluster.start_cloud(CloudConfig(actors=1, metrics_port=0, partitions=str(manifest_path)), ray_cfg)
        stack.callback(cluster.stop_tier, cloud)
        edge = cluster.start_edge(EdgeConfig(actors=1, metrics_port=0, partitions=str(part_dir),
                                             group=f"bench-part-{mode}{tag}", **edge_kw), mqtt_cfg, ray_cfg,
                                  cloud.names)
        stack.callback(cluster.stop_tier, edge, "stop")
        collector = ResultCollector(via, f"edgeq-bench-partition-{mode}").start()
        before = _edge_counts(edge)
        tree = ProcessTree((os.getpid(),)).start()
        up0, down0 = link.bytes_up, link.bytes_down
        report = publish(via, PublishConfig(devices=cfg.devices, rate_hz=cfg.rate / cfg.devices,
                                            duration_s=cfg.seconds, data_dir=cfg.data_dir,
                                            device_prefix=f"p{mode[:3]}{tag}-", **pub_kw))
        collector.wait_for(report.total("acked"), cfg.drain_s)
        cpu, _ = tree.stop()
        stats = collector.stop()
        counts = _edge_counts(edge) - before
    n = len(stats.unique)
    if n == 0:
        raise RuntimeError(f"{spec.name} {mode}: no frame answered of {report.total('acked')} sent")
    first = int(min(cfg.warmup_s, cfg.seconds / 4) * cfg.rate / cfg.devices)  # seq of a device's first steady frame
    lat = np.array([r.latency_ms for r in stats.unique.values() if r.seq >= first] or stats.latencies_ms)
    p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
    split = {ALL_EDGE: "input raw (edge answers)", ALL_CLOUD: "input raw (cloud answers)",
             CONFIDENCE: "input denoised (confidence)"}.get(mode, f"{cut} {cfg.codec}")
    progress(f"  {spec.name} {mode}{' ' + cut if cut else ''}: {n}/{report.total('acked')} answered, "
             f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (all frames: {stats.latency_percentile(99):.1f}), "
             f"link up {link.bytes_up - up0:,} B / down {link.bytes_down - down0:,} B")
    return ModeResult(spec.name, BEST_FIXED if mode == FIXED else mode, split, n, p50, p99,
                      {"device_to_edge": report.total("bytes_sent") / n,
                       "edge_to_cloud": counts.get("bytes_edge_to_cloud", 0) / n, "results": stats.bytes / n},
                      stats.accuracy or 0.0, cpu * 1e6 / n)


def run_link(spec: LinkSpec, broker, mqtt_cfg, cfg: ModesConfig, part: tuple[dict, Path], progress) -> list:
    """Every configured mode on `spec`; the best fixed split is the candidate with the lowest p99."""
    manifest, manifest_path = part
    part_dir = manifest_path.parent
    out: list[ModeResult] = []
    def go(mode, **kw):
        return run_mode(mode, spec, broker, mqtt_cfg, cfg, part_dir, manifest_path, progress, **kw)
    for mode in (ALL_EDGE, ALL_CLOUD, CONFIDENCE):
        if mode in cfg.modes:
            out.append(go(mode))
    if BEST_FIXED in cfg.modes:
        fixed = [go(FIXED, cut=c) for c in cfg.cuts]
        out.append(min(fixed, key=lambda r: r.p99_ms))
    if PLANNER in cfg.modes:
        option, expected = plan_for(manifest, spec, cfg.codec)
        progress(f"  {spec.name} planner: {option.cut} {option.codec}, expected {expected:.1f} ms")
        cut = None if option.cut == "input" else option.cut.split("@")[-1]
        r = go(ALL_EDGE if cut is None else FIXED, cut=cut, tag="-plan")
        out.append(ModeResult(r.link, PLANNER, r.split, r.frames, r.p50_ms, r.p99_ms, r.bytes_per_frame,
                              r.accuracy, r.cpu_us_per_frame, expected))
    return out


def measure(specs, cfg: ModesConfig, progress, work_dir: Path) -> list[ModeResult]:
    """One broker, the partition prepared once, every link's modes in turn."""
    import ray

    from cloud_workers.config import RayConfig
    from infra import cluster
    from infra.broker import MosquittoBroker
    from publishers.mqtt import MqttConfig

    part = prepare_partition(work_dir, cfg.cuts, progress)
    results: list[ModeResult] = []
    started = cluster.connect(RayConfig(), 2, 2)
    try:
        with MosquittoBroker() as broker:
            mqtt_cfg = MqttConfig(host=broker.host, port=broker.port, qos=1)
            for spec in specs:
                progress(f"link {spec.name}: modes {', '.join(cfg.modes)}, {cfg.rate:g} frames/s for "
                         f"{cfg.seconds:g} s")
                results += run_link(spec, broker, mqtt_cfg, cfg, part, progress)
    finally:
        if started:
            ray.shutdown()
    return results

