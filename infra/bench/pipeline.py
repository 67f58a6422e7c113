"""`edgeq bench pipeline`: edgeq, cloud-only and the MQTT ceiling, measured side by side in one run.

Three modes share one Mosquitto and one pool of publisher processes:

- ``edgeq``: edge actors with the confidence policy (Q-CNN when its runtime
  is installed), uncertain frames up to cloud actors;
- ``cloud-only``: edge actors forward every raw frame (codec ``raw``) to the
  cloud model, the design edge inference improves on;
- ``ceiling``: the same number of plain paho subscribers in the same shared
  subscription, only recording arrivals: the most an MQTT-fed pipeline can do
  on this machine.

Each mode first searches its saturation rate (probes at doubling offered
rates until answers stop keeping up, then a geometric bisection; see
:func:`find_saturation`), then runs phases at fixed fractions of *edgeq's*
sustained rate for latency. edgeq runs first, so its rate sets the loads of
the others; Ray is shut down before the ceiling runs. One phase is
:mod:`infra.bench.pipeline_phases`; tables and the latency plot come from
:mod:`infra.bench.pipeline_report`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from infra.bench.pipeline_phases import Phase, run_ceiling_phase, run_tier_phase
from infra.bench.pipeline_runs import MODES, ModeResult, PipelineBenchConfig, load_name

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

def edge_runtime() -> tuple[str, str]:
    """(runtime, model file): the Q-CNN when its runtime imports, else the float ONNX edge CNN."""
    try:
        import edge_workers.qcnn.runtime  # noqa: F401 - registers `qcnn`; needs numba and onnxruntime-extensions
    except ImportError as err:
        logger.warning("Q-CNN runtime unavailable (%s): the edge runs the float model", err)
        return "onnx", "edge_cnn.onnx"
    return "qcnn", "edge_cnn.qcnn.onnx"


# ------------------------------------------------------------------ modes

def _report(mode: str, p: Phase, progress: Progress) -> None:
    progress(f"[bench] {mode:10s} {p.name:12s} offered {p.offered:7.0f}/s captured {p.captured_rate:7.1f}/s "
             f"answered {p.answered}/{p.sent} rate {p.rate:7.1f}/s p50 {p.pct(50):7.1f} ms "
             f"p99 {p.pct(99):7.1f} ms dropped {p.dropped}")


def find_saturation(mode: str, result: ModeResult, cfg: PipelineBenchConfig,
                    run_one: Callable[[str, float, float], Phase], progress: Progress) -> None:
    """Highest sustained throughput: double the offered rate from `start_rate` until a probe fails (halve
    if the first fails), then `bisect` geometric steps between the highest sustained and the lowest failed
    offered rate. `result.best` is the sustained probe with the highest throughput, which need not be the one
    offered most: past what the devices can generate, throughput varies from probe to probe."""
    good: Phase | None = None  # the best sustained probe so far
    lo: float | None = None    # the highest sustained offered rate (the bisection's lower end)
    bad: float | None = None
    rate = cfg.start_rate

    def probe(r: float) -> Phase:
        p = run_one(f"probe {r:.0f}/s", r, cfg.probe_s)
        result.probes.append(p)
        _report(mode, p, progress)
        return p

    while len(result.probes) < cfg.max_probes:
        p = probe(rate)
        if p.sustained(cfg.sustain, cfg.max_p99_ms):
            previous, good = good, p if good is None or p.throughput > good.throughput else good
            lo = rate
            if bad is not None:
                break
            if p.publisher_limited(cfg.sustain) and previous is not None \
                    and p.captured_rate < 1.05 * previous.captured_rate:
                # The devices generated no more frames when asked for twice as many: on a shared host the
                # publishers (and the broker) have the CPU; what the pipeline can take is not the limit.
                result.publisher_limited = True
                progress(f"[bench] {mode}: the devices generated only {p.captured_rate:.0f} of {rate:.0f} "
                         "frames/s offered, no more than at half that rate: stopping the search")
                break
            rate *= 2
        else:
            bad = rate
            if good is not None:
                break
            rate /= 2
    for _ in range(cfg.bisect):
        if lo is None or bad is None:
            break
        p = probe(float(np.sqrt(lo * bad)))
        if p.sustained(cfg.sustain, cfg.max_p99_ms):
            lo = p.offered
            good = p if p.throughput > good.throughput else good
        else:
            bad = p.offered
    result.best = good
    progress(f"[bench] {mode}: sustained {result.saturation:.1f} frames/s")


def _run_phases(mode: str, result: ModeResult, cfg: PipelineBenchConfig, rates: list[float] | None,
                run_one: Callable[[str, float, float], Phase], progress: Progress) -> None:
    """The saturation search, then one phase per load; `rates` None = loads of this mode's own saturation."""
    find_saturation(mode, result, cfg, run_one, progress)
    if rates is None:
        rates = [f * result.saturation for f in cfg.loads]
    for fraction, offered in zip(cfg.loads, rates, strict=True):
        if offered <= 0:
            continue
        p = run_one(load_name(fraction), offered, cfg.duration_s)
        result.phases.append(p)
        _report(mode, p, progress)


def run_tiers(mode: str, cfg: PipelineBenchConfig, mqtt_cfg, pool, rates, progress: Progress,
              load_cpus=None) -> ModeResult:
    """edgeq or cloud-only: cloud and edge actors in a namespace of their own, a results sink, the phases."""
    from cloud_workers.config import CloudConfig, RayConfig
    from edge_workers.config import EdgeConfig
    from infra import cluster
    from infra.bench.loadgen import Sink
    from publishers import topics

    runtime, model = edge_runtime()
    policy, codec = ("confidence", "denoised") if mode == "edgeq" else ("cloud-only", "raw")
    ray_cfg = RayConfig(namespace=f"edgeq-bench-{mode}")
    edge_cfg = EdgeConfig(actors=cfg.edge_actors, policy=policy, codec=codec, runtime=runtime, model=model,
                          batch_max=cfg.batch_max, batch_wait_ms=cfg.batch_wait_ms, metrics_port=0,
                          group=f"edgeq-bench-{mode}")
    result = ModeResult(mode, f"policy {policy}, codec {codec}, edge runtime {runtime}, {cfg.edge_actors} edge / "
                              f"{cfg.cloud_actors} cloud actors, batch <= {cfg.batch_max}")
    with contextlib.ExitStack() as stack:
        cloud = cluster.start_cloud(CloudConfig(actors=cfg.cloud_actors, metrics_port=0), ray_cfg)
        stack.callback(cluster.stop_tier, cloud)
        edge = cluster.start_edge(edge_cfg, mqtt_cfg, ray_cfg, cloud.names)
        stack.callback(cluster.stop_tier, edge, "stop")
        sink = Sink(mqtt_cfg, topics.RESULTS_FILTER, f"edgeq-bench-results-{mode}", frames=False, cpus=load_cpus)
        stack.callback(sink.close)
        exclude = (os.getpid(), sink.pid, *pool.pids)
        _run_phases(mode, result, cfg, rates, lambda name, offered, seconds: run_tier_phase(
            name, offered, seconds, pool, sink, edge, exclude, cfg), progress)
    return result


def run_ceiling(cfg: PipelineBenchConfig, mqtt_cfg, pool, rates, progress: Progress, load_cpus=None) -> ModeResult:
    """Plain paho subscribers in a shared subscription, one per edge actor, only recording arrivals."""
    from infra.bench.loadgen import Sink
    from publishers import topics

    result = ModeResult("ceiling", f"{cfg.edge_actors} plain paho subscribers (own processes) in a shared "
                                   "subscription, recording arrivals only")
    sinks = []
    try:
        for i in range(cfg.edge_actors):
            sinks.append(Sink(mqtt_cfg, topics.shared(topics.FRAMES_FILTER, "edgeq-bench-ceiling"),
                              f"edgeq-bench-ceiling-{i}", frames=True, cpus=None))  # the ceiling's pipeline
        exclude = (os.getpid(), *pool.pids)
        _run_phases("ceiling", result, cfg, rates, lambda name, offered, seconds: run_ceiling_phase(
            name, offered, seconds, pool, sinks, exclude, cfg), progress)
    finally:
        for s in sinks:
            s.close()
    return result


def measure(cfg: PipelineBenchConfig, progress: Progress, pin: tuple[set[int], set[int]] | None = None
            ) -> dict[str, ModeResult]:
    """Run edgeq, cloud-only and the ceiling against one broker and one publisher pool.

    pin: (load generator CPUs, pipeline CPUs) from `loadgen.pin_plan`: the publishers and the results sink
    run on the first, this driver and what it starts (Mosquitto, Ray and its actors, the ceiling's
    subscribers) on the second; None = no pinning.
    """
    import ray

    from cloud_workers.config import RayConfig
    from infra import cluster
    from infra.bench.loadgen import PublisherPool
    from infra.broker import MosquittoBroker
    from publishers.config import PublishConfig
    from publishers.mqtt import MqttConfig

    out: dict[str, ModeResult] = {}
    load_cpus = None
    with contextlib.ExitStack() as stack:
        if pin is not None:
            load_cpus, pipeline_cpus = pin
            stack.callback(os.sched_setaffinity, 0, os.sched_getaffinity(0))
            os.sched_setaffinity(0, pipeline_cpus)  # inherited by everything started from here
            progress(f"[bench] load generator on CPUs {sorted(load_cpus)}, pipeline on {sorted(pipeline_cpus)}")
        broker = stack.enter_context(MosquittoBroker())
        mqtt_cfg = MqttConfig(host=broker.host, port=broker.port, qos=cfg.qos)
        pub_cfg = PublishConfig(devices=cfg.devices, data_dir=cfg.data_dir, noise=cfg.noise, seed=cfg.seed)
        pool = PublisherPool(mqtt_cfg, pub_cfg, cfg.publishers, cpus=load_cpus)
        stack.callback(pool.close)
        progress(f"[bench] mosquitto on {broker.address}, {cfg.devices} devices in {cfg.publishers} "
                 f"publisher processes, QoS {cfg.qos}")
        started = cluster.connect(RayConfig(), 2 * cfg.edge_actors, 2 * cfg.cloud_actors)
        try:
            out["edgeq"] = run_tiers("edgeq", cfg, mqtt_cfg, pool, None, progress, load_cpus)
            rates = [f * out["edgeq"].saturation for f in cfg.loads]
            out["cloud-only"] = run_tiers("cloud-only", cfg, mqtt_cfg, pool, rates, progress, load_cpus)
        finally:
            if started:
                ray.shutdown()
        out["ceiling"] = run_ceiling(cfg, mqtt_cfg, pool, rates, progress, load_cpus)
    return {m: out[m] for m in MODES}


# ------------------------------------------------------------------ report

CPU_GROUPS = ("publishers", "results sink", "ceiling subscribers", "mosquitto", "edge actors", "cloud actors",
              "ray, other", "driver")


def cpu_table(modes: dict[str, ModeResult], cfg: PipelineBenchConfig, pin=None):
    """CPU microseconds per answered frame of each process group, per mode, in the phase whose CPU the
    summary reports (50 % of edgeq's rate); the load generator (publishers, results sink) included."""
    from infra.bench.pipeline_report import cost_phase
    from infra.bench.report import Table

    phase = cost_phase(cfg)
    pinned = (f"publishers and results sink pinned to CPUs {sorted(pin[0])}, the rest to {sorted(pin[1])}"
              if pin else "nothing pinned (`--pin-load`)")
    table = Table(f"CPU per answered frame by process group at {phase} of edgeq's rate (us)",
                  ["process group", *MODES],
                  note=f"Read from /proc over the phase, publishing and draining. The publishers and the results "
                       f"sink are the load generator: the summary's CPU column leaves them out. {pinned}.")
    phases = {m: modes[m].phase(phase) for m in MODES}
    used = [g for g in CPU_GROUPS if any(p is not None and g in p.cpu_groups for p in phases.values())]
    extra = sorted({g for p in phases.values() if p is not None for g in p.cpu_groups} - set(CPU_GROUPS))

    def cell(m: str, value) -> str:
        p = phases[m]
        return "n/a" if p is None or not p.answered else f"{1e6 * value(p) / p.answered:,.1f}"

    for g in used + extra:
        table.add(g, *(cell(m, lambda p, g=g: p.cpu_groups.get(g, 0.0)) for m in MODES))
    table.add("total", *(cell(m, lambda p: sum(p.cpu_groups.values())) for m in MODES))
    return table


HISTORY = "pipeline_runs.json"  # every run's headline figures, next to pipeline.md


def record_run(out_dir: Path, modes: dict[str, ModeResult], cfg: PipelineBenchConfig, elapsed_s: float,
               load: tuple[float, float] | None):
    """Append this run's headline figures to out_dir/pipeline_runs.json; return the table of every run in it
    (newest last), so repeated runs of one commit are compared in pipeline.md."""
    from infra.bench.pipeline_report import summary_rows, targets
    from infra.bench.report import Table
    from modelstore.files import write_text_atomic

    path = Path(out_dir) / HISTORY
    try:
        history = json.loads(path.read_text()) if path.exists() else []
    except (OSError, ValueError):
        history = []
    rows, met = summary_rows(modes, cfg), targets(modes, cfg)
    half = modes["edgeq"].phase(load_name(0.5))
    history.append({
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), "commit": _commit(),
        "edgeq": round(modes["edgeq"].saturation, 1), "ceiling": round(modes["ceiling"].saturation, 1),
        "x_ceiling": None if rows["edgeq"]["rate_x"] is None else round(rows["edgeq"]["rate_x"], 3),
        "p99_half_ms": None if half is None else round(half.pct(99), 1),
        "targets_met": all(m[3] for m in met), "seconds": round(elapsed_s), "load": list(load or ()),
    })
    write_text_atomic(path, json.dumps(history, indent=1) + "\n")
    table = Table("Every run recorded in pipeline_runs.json (newest last)",
                  ["UTC", "commit", "edgeq frames/s", "ceiling frames/s", "x ceiling", "p99 at 50 %", "load avg",
                   "all targets"])
    for r in history:
        table.add(r["utc"], r["commit"], f"{r['edgeq']:,.0f}", f"{r['ceiling']:,.0f}",
                  "n/a" if r["x_ceiling"] is None else f"{r['x_ceiling']:.2f}x",
                  "n/a" if r["p99_half_ms"] is None else f"{r['p99_half_ms']:.1f} ms",
                  " -> ".join(f"{x:.1f}" for x in r["load"]) or "n/a", "yes" if r["targets_met"] else "NO")
    return table


def _commit() -> str:
    """The checkout's short commit, with `+changes` when tracked files differ from it ("unknown" outside git)."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+changes" if dirty else "")


# ------------------------------------------------------------------ CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = PipelineBenchConfig()
    p.add_argument("--duration", type=float, default=d.duration_s, metavar="S", help="seconds per latency phase")
    p.add_argument("--probe", type=float, default=d.probe_s, metavar="S",
                   help="seconds per probe of the saturation search")
    p.add_argument("--start-rate", type=float, default=d.start_rate, metavar="FPS",
                   help="first probe's frames/s (doubled until not sustained, then bisected)")
    p.add_argument("--bisect", type=int, default=d.bisect, help="bisection probes after the doubling")
    p.add_argument("--max-probes", type=int, default=d.max_probes, help="bound on the doubling probes")
    p.add_argument("--max-p99-ms", type=float, default=d.max_p99_ms,
                   help="a probe with a higher p99 is not sustained (a queue is building up)")
    p.add_argument("--warmup", type=float, default=d.warmup_s, metavar="S",
                   help="first seconds of each phase left out of rates and latencies")
    p.add_argument("--loads", default=",".join(f"{f:g}" for f in d.loads),
                   help="latency phases, as fractions of edgeq's saturation rate")
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument("--publishers", type=int, default=d.publishers, help="publisher processes sharing the devices")
    p.add_argument("--edge-actors", type=int, default=d.edge_actors, help="edge actors (and ceiling subscribers)")
    p.add_argument("--cloud-actors", type=int, default=d.cloud_actors)
    p.add_argument("--batch-max", type=int, default=d.batch_max)
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms)
    p.add_argument("--qos", type=int, choices=(0, 1), default=d.qos)
    p.add_argument("--noise", default=d.noise, help="device noise: none, gaussian, salt-pepper, ...")
    p.add_argument("--data-dir", default=d.data_dir)
    p.add_argument("--out-dir", default=d.out_dir, help='where pipeline.md and the plot go ("" = print only)')
    p.add_argument("--pin-load", default="auto", metavar="off|auto|CPUS",
                   help="run the publishers and the results sink on their own CPUs (os.sched_setaffinity), the "
                        "pipeline on the others: a CPU list (e.g. 3 or 2,3), off, or auto = the last CPU when at "
                        "least 4 are usable (default; on fewer nothing is pinned)")


def config_from_args(args: argparse.Namespace) -> PipelineBenchConfig:
    return PipelineBenchConfig(
        duration_s=args.duration, probe_s=args.probe, start_rate=args.start_rate, bisect=args.bisect,
        max_probes=args.max_probes,
        max_p99_ms=args.max_p99_ms, warmup_s=args.warmup,
        loads=tuple(float(x) for x in args.loads.split(",") if x.strip()), devices=args.devices,
        publishers=args.publishers, edge_actors=args.edge_actors, cloud_actors=args.cloud_actors,
        batch_max=args.batch_max, batch_wait_ms=args.batch_wait_ms, qos=args.qos, noise=args.noise,
        data_dir=args.data_dir, out_dir=args.out_dir,
    )


def run(args: argparse.Namespace, progress: Progress) -> str:
    from infra.bench import pipeline_report
    from infra.bench.loadgen import pin_plan

    cfg = config_from_args(args)
    pin = pin_plan(getattr(args, "pin_load", "off"))
    t0, load0 = time.monotonic(), os.getloadavg()[0]
    modes = measure(cfg, progress, pin)
    elapsed, load = time.monotonic() - t0, (load0, os.getloadavg()[0])
    command = "edgeq bench pipeline " + " ".join(shlex.quote(a) for a in sys.argv[3:]) if len(sys.argv) > 3 \
        else "edgeq bench pipeline"
    tables = [*pipeline_report.tables(modes, cfg), cpu_table(modes, cfg, pin)]
    text = "\n\n".join(t.text() for t in tables) + (f"\n\n(run took {elapsed:.0f}s; load average "
                                                     f"{load[0]:.1f} at the start, {load[1]:.1f} at the end)")
    if cfg.out_dir:
        tables.append(record_run(Path(cfg.out_dir), modes, cfg, elapsed, load))
        path = pipeline_report.write(Path(cfg.out_dir), modes, cfg, tables, command.strip(), elapsed, load)
        text += f"\nwritten to {path}"
    return text
