"""`edgeq demo`: broker, Ray, cloud and edge workers, simulated devices and a results summary, on one machine."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from infra import cluster
from infra.broker import MosquittoBroker
from infra.collector import ResultCollector, ResultStats
from infra.prometheus_server import write_targets_file
from publishers.run import Progress, PublishReport, build_devices, run_devices

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = Path(__file__).resolve().parent / "prometheus" / "targets" / "edgeq.json"


@dataclass
class DemoResult:
    """Everything the summary reports, for tests and benchmarks to check."""

    report: PublishReport
    answers: ResultStats
    edge: dict[str, int]
    cloud: dict[str, int]
    seconds: float
    metrics_targets: list[str]
    broker: str

    @property
    def sent(self) -> int:
        """Distinct frames the broker confirmed (a device's re-sends, publish.resend_after_s, count once)."""
        return self.report.total("acked") - self.report.total("resent")

    @property
    def lost(self) -> int:
        return max(0, self.sent - len(self.answers.unique))


def _sum(dicts: list[dict]) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for d in dicts:
        total.update({k: v for k, v in d.items() if isinstance(v, (int, float))})
    return dict(total)


def run_pipeline(cfg, use_broker: bool, progress: Progress) -> DemoResult:
    """Stand everything up, publish cfg.publish's frames, wait for the answers, tear down."""
    mqtt_cfg = cfg.mqtt
    with contextlib.ExitStack() as stack:
        if not use_broker:
            broker = stack.enter_context(MosquittoBroker())
            mqtt_cfg = dataclasses.replace(mqtt_cfg, host=broker.host, port=broker.port)
            progress(f"[demo] started mosquitto on {broker.address}")
        if cluster.connect(cfg.ray, cfg.edge.actors, cfg.cloud.actors):
            import ray

            stack.callback(ray.shutdown)
            progress("[demo] started a local Ray")
        t0 = time.monotonic()
        cloud = cluster.start_cloud(cfg.cloud, cfg.ray)
        stack.callback(cluster.stop_tier, cloud)
        edge = cluster.start_edge(cfg.edge, mqtt_cfg, cfg.ray, cloud.names)
        stack.callback(cluster.stop_tier, edge)
        progress(f"[demo] {cfg.cloud.actors} cloud and {cfg.edge.actors} edge workers up in "
                 f"{time.monotonic() - t0:.1f}s (policy {cfg.edge.policy}, codec {cfg.edge.codec}, "
                 f"runtime {cfg.edge.runtime})")
        targets = edge.metrics_targets() + cloud.metrics_targets()
        targets_file = Path(cfg.demo.targets_file) if cfg.demo.targets_file else DEFAULT_TARGETS
        write_targets_file(targets_file, targets, {"deployment": "demo"})
        progress(f"[demo] metrics endpoints {', '.join(targets)} (Prometheus targets in {targets_file})")

        collector = ResultCollector(mqtt_cfg).start()
        stack.callback(collector.stop)
        devices = build_devices(mqtt_cfg, cfg.publish)
        progress(f"[demo] {len(devices)} devices publishing to {mqtt_cfg.address}")
        t_pub = time.monotonic()
        reports: list[PublishReport] = []
        pub = threading.Thread(target=lambda: reports.append(run_devices(devices)), daemon=True)
        pub.start()
        while pub.is_alive():
            pub.join(cfg.publish.progress_s)
            s = collector.stats
            progress(f"[demo] {time.monotonic() - t_pub:5.1f}s sent {sum(d.stats.acked for d in devices)} "
                     f"answered {collector.answered()} (edge {s.tiers['edge']}, cloud {s.tiers['cloud']})")
        report = reports[0]
        if not collector.wait_for(report.total("acked") - report.total("resent"), cfg.demo.answer_timeout_s):
            progress(f"[demo] gave up waiting for answers after {cfg.demo.answer_timeout_s:.0f}s")
        seconds = time.monotonic() - t_pub
        edge_stats = _sum(cluster.stop_tier(edge, "stop"))
        cloud_stats = _sum(cluster.stop_tier(cloud, "stats"))
        answers = collector.stop()
        return DemoResult(report, answers, edge_stats, cloud_stats, seconds, targets, mqtt_cfg.address)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def summary(r: DemoResult) -> str:
    a, e = r.answers, r.edge
    n = max(len(a.unique), 1)
    d2e, e2c = e.get("bytes_device_to_edge", 0), e.get("bytes_edge_to_cloud", 0)
    rejected = {k.split(".", 1)[1]: v for k, v in e.items() if k.startswith("rejected.")}
    drops = {k.split(".", 1)[1]: v for k, v in e.items() if k.startswith("dropped.") and v}
    pixels = e.get("pixel_bytes", 0)  # what a cloud-only design ships: the frames' pixels (plus framing)
    cloud_only = f"{pixels / e2c:.0f}x more" if e2c else "edgeq sent nothing up"
    lines = [
        "edgeq demo summary",
        f"  broker                 {r.broker}",
        f"  frames sent            {r.sent} (confirmed by the broker), drops at devices: {r.report.dropped or 'none'}"
        + (f", re-sent without a result {r.report.total('resent')}" if r.report.total("resent") else ""),
        f"  frames answered        {len(a.unique)} unique, {a.duplicates} duplicates, lost {r.lost}",
        f"  throughput             {len(a.unique) / max(r.seconds, 1e-9):.1f} frames/s over {r.seconds:.1f}s",
        f"  latency capture->result p50 {a.latency_percentile(50):.1f} ms, p99 {a.latency_percentile(99):.1f} ms",
        f"  accuracy               {_pct(a.accuracy)} on {a.labelled} labelled frames "
        f"(edge {_pct(a.tier_accuracy('edge'))}, cloud {_pct(a.tier_accuracy('cloud'))})",
        f"  answered at            edge {a.tiers['edge']} ({100 * a.tiers['edge'] / n:.1f} %), "
        f"cloud {a.tiers['cloud']} ({100 * a.tiers['cloud'] / n:.1f} %), degraded {a.degraded}",
        f"  cloud calls            ok {e.get('cloud_ok', 0)}, timeout {e.get('cloud_timeout', 0)}, "
        f"error {e.get('cloud_error', 0)}",
        f"  rejected at the edge   {rejected or 'none'}; dropped {drops or 'none'}",
        f"  bytes device->edge     {d2e} ({d2e / n:.0f} per frame)",
        f"  bytes edge->cloud      {e2c} ({e2c / n:.1f} per frame)",
        f"  bytes edge->device     {a.bytes} (result messages)",
        f"  cloud-only, raw frames {pixels} bytes of pixels to the cloud for the same frames ({d2e} as wire "
        f"frames), {cloud_only} than edgeq's uplink payload",
        f"  metrics                {', '.join('http://' + t + '/metrics' for t in r.metrics_targets)}",
    ]
    return "\n".join(lines)
