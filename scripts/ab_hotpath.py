"""A/B harness for the MQTT hot path: edgeq at fixed offered rates, CPU per answered frame per process group.

Run it from a checkout (or with PYTHONPATH pointing at one): it uses only APIs that the
hot path's previous versions have too (infra.bench.loadgen, infra.bench.pipeline_phases,
infra.cluster), so the same file measures an older commit from a `git worktree`:

    .venv/bin/python scripts/ab_hotpath.py --rates 1500,6000 --seconds 12 --label new
    PYTHONPATH=/tmp/edgeq-old .venv/bin/python scripts/ab_hotpath.py --rates 1500,6000 --label old

Each rate is one phase (the pipeline bench's: publish for --seconds, drain, statistics over the steady
window); the output is one JSON line per phase: offered and answered frames/s, p50/p99/p99.9, tiers,
and CPU microseconds per answered frame of each process group (publishers, results sink, mosquitto,
edge actors, cloud actors, the rest of Ray and the driver), read from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path


def _group(pid: int, pool_pids: set, sink_pid: int) -> str:
    if pid in pool_pids:
        return "publishers"
    if pid == sink_pid:
        return "sink"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if "mosquitto" in cmd.split(" ")[0]:
        return "mosquitto"
    if cmd.startswith("ray::EdgeWorker"):
        return "edge"
    if cmd.startswith("ray::CloudWorker"):
        return "cloud"
    return "ray+driver"


class GroupCpu:
    """CPU seconds per process group of this process tree between start() and stop(), sampled every 0.5 s."""

    def __init__(self, pool_pids, sink_pid):
        from infra.bench.loadgen import descendants, proc_stats

        self._stats, self._desc = proc_stats, descendants
        self.pool_pids, self.sink_pid = set(pool_pids), sink_pid
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._groups: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._baseline = True

    def _sample(self):
        stats = self._stats()
        pids = set(self._desc(os.getpid(), stats))
        for pool_pid in self.pool_pids:
            pids |= self._desc(pool_pid, stats)
        for pid in pids:
            if pid not in stats:
                continue
            cpu = stats[pid][1]
            self._first.setdefault(pid, cpu if self._baseline else 0.0)
            self._last[pid] = cpu
            if pid not in self._groups:
                ppid = stats[pid][0]
                self._groups[pid] = _group(ppid if ppid in self.pool_pids else pid, self.pool_pids, self.sink_pid)

    def _run(self):
        while not self._stop.wait(0.5):
            self._sample()

    def start(self):
        self._sample()
        self._baseline = False
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        out: dict[str, float] = {}
        for pid, last in self._last.items():
            g = self._groups[pid]
            out[g] = out.get(g, 0.0) + last - self._first.get(pid, 0.0)
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="1500,6000", help="offered frames/s, one phase each")
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--label", default=os.path.basename(os.getcwd()))
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--publishers", type=int, default=2)
    p.add_argument("--edge-actors", type=int, default=2)
    p.add_argument("--cloud-actors", type=int, default=1)
    p.add_argument("--saturate", action="store_true",
                   help="first search the sustained rate as `edgeq bench pipeline` does (short probes)")
    p.add_argument("--probe", type=float, default=6.0, help="seconds per saturation probe")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / "data" / "mnist"))
    args = p.parse_args()

    import contextlib

    import ray

    import edge_workers.ingest as ingest_mod
    from cloud_workers.config import CloudConfig, RayConfig
    from edge_workers.config import EdgeConfig
    from infra import cluster
    from infra.bench import pipeline_phases
    from infra.bench.loadgen import PublisherPool, Sink
    from infra.bench.pipeline import ModeResult, PipelineBenchConfig, edge_runtime, find_saturation
    from infra.broker import MosquittoBroker
    from publishers import topics
    from publishers.config import PublishConfig
    from publishers.mqtt import MqttConfig
    source = Path(ingest_mod.__file__).resolve().parents[1]
    cfg = PipelineBenchConfig(duration_s=args.seconds, warmup_s=args.warmup, devices=args.devices,
                              publishers=args.publishers, edge_actors=args.edge_actors,
                              cloud_actors=args.cloud_actors, data_dir=args.data_dir, out_dir="",
                              probe_s=args.probe, start_rate=1000.0)
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(MosquittoBroker())
        mqtt_cfg = MqttConfig(host=broker.host, port=broker.port, qos=1)
        pub_cfg = PublishConfig(devices=cfg.devices, data_dir=cfg.data_dir, seed=0)
        pool = PublisherPool(mqtt_cfg, pub_cfg, cfg.publishers)
        stack.callback(pool.close)
        cluster.connect(RayConfig(), 2 * cfg.edge_actors, 2 * cfg.cloud_actors)
        stack.callback(ray.shutdown)
        runtime, model = edge_runtime()
        ray_cfg = RayConfig(namespace="edgeq-ab")
        cloud = cluster.start_cloud(CloudConfig(actors=cfg.cloud_actors, metrics_port=0), ray_cfg)
        stack.callback(cluster.stop_tier, cloud)
        edge_cfg = EdgeConfig(actors=cfg.edge_actors, policy="confidence", codec="denoised", runtime=runtime,
                              model=model, batch_max=cfg.batch_max, batch_wait_ms=cfg.batch_wait_ms, metrics_port=0,
                              group="edgeq-ab")
        edge = cluster.start_edge(edge_cfg, mqtt_cfg, ray_cfg, cloud.names)
        stack.callback(cluster.stop_tier, edge, "stop")
        sink = Sink(mqtt_cfg, topics.RESULTS_FILTER, "edgeq-ab-results", frames=False)
        stack.callback(sink.close)
        exclude = (os.getpid(), sink.pid, *pool.pids)
        pool.run("ab-warm-d", 500, 4.0)  # warm every actor (numba, onnxruntime, Ray's paths)
        time.sleep(1.0)
        sink.take()
        if args.saturate:
            result = ModeResult("edgeq", "")
            find_saturation("edgeq", result, cfg, lambda name, offered, seconds: pipeline_phases.run_tier_phase(
                name, offered, seconds, pool, sink, edge, exclude, cfg), lambda line: print(line, file=sys.stderr))
            print(json.dumps({"label": args.label, "saturation": round(result.saturation, 1),
                              "probes": [[round(q.offered), round(q.throughput), round(q.pct(99), 1)]
                                         for q in result.probes]}), flush=True)
        for rate in (float(r) for r in args.rates.split(",") if r.strip()):
            cpu = GroupCpu(pool.pids, sink.pid).start()
            t0 = time.monotonic()
            ph = pipeline_phases.run_tier_phase(f"{rate:.0f}/s", rate, cfg.duration_s, pool, sink, edge, exclude, cfg)
            groups = cpu.stop()
            n = max(ph.answered, 1)
            print(json.dumps({
                "label": args.label, "source": str(source), "offered": rate, "answered": ph.answered,
                "sent": ph.sent, "captured_rate": round(ph.captured_rate, 1), "rate": round(ph.rate, 1),
                "throughput": round(ph.throughput, 1), "p50": round(ph.pct(50), 2), "p99": round(ph.pct(99), 2),
                "p999": round(ph.pct(99.9), 2), "tiers": dict(ph.tiers), "dropped": ph.dropped,
                "duplicates": ph.duplicates, "wall_s": round(time.monotonic() - t0, 1),
                "cpu_us_per_frame": {g: round(1e6 * s / n, 1) for g, s in sorted(groups.items())},
                "cpu_us_total": round(1e6 * sum(groups.values()) / n, 1),
                "loadavg": os.getloadavg()[0],
            }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
