"""`edgeq bench partition`: split computing over emulated links: the link checks, then the pipeline modes per link.

Each emulated link (``infra.bench.links``) is checked against a timed echo and transfer. Then, per link, the
pipeline modes of ``infra.bench.partition_modes`` run in turn with the devices behind the link (all-edge, all-cloud,
confidence routing, the best fixed split, the planner's choice), and docs/results/partition.md gets the tables,
the issue's targets with their ratios, and the latency plot. The adaptive run over a changing link has its control
loop here (``run_adaptive``) but is not wired to the workers yet: it is reported as not measured.
Benchmark modules import only the standard library and numpy at top level.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.bench.links import BENCH_LINKS, EmulatedLink, LinkCheck, LinkSpec, check_link
from infra.bench.partition_report import AdaptivePoint, AdaptiveRun, link_check_table

Progress = Callable[[str], None]
OUT_DIR = Path(__file__).resolve().parents[2] / "docs" / "results"
PAGE = "partition.md"
ADAPTIVE_PENDING = ("the adaptive run (the link changing mid-stream, the controller's choice following it): "
                    "run_adaptive's measure/apply hooks are not wired to the edge workers, and the edge's controller "
                    "measures the edge -> cloud hop, not the emulated device -> broker one")
QUICK = {"seconds": 3.0, "transfer_s": 1.0, "pings": 10}


def add_arguments(p: argparse.ArgumentParser) -> None:
    names = ", ".join(s.name for s in BENCH_LINKS)
    p.add_argument("--links", help=f"comma-separated emulated links (default all: {names})")
    p.add_argument("--transfer-s", type=float, help="seconds of each timed transfer per link (default 4)")
    p.add_argument("--pings", type=int, help="echoes per link for the RTT (default 30)")
    p.add_argument("--check-links-only", action="store_true", help="only check the emulated links' accuracy")
    p.add_argument("--quick", action="store_true",
                   help=f"a short run: {QUICK['seconds']:g} s per mode, {QUICK['transfer_s']:g} s transfers")
    p.add_argument("--seconds", type=float, help="publishing time per mode (default 10)")
    p.add_argument("--rate", type=float, default=100.0, help="frames/s offered per mode, in total (default 100)")
    p.add_argument("--devices", type=int, default=4, help="devices sharing the rate (default 4)")
    p.add_argument("--cuts", help="fixed-split candidates, cut points of edge_cnn (default pool2,fc1)")
    p.add_argument("--modes", help="comma-separated modes (default all-edge,all-cloud,confidence,"
                                   "best-fixed-split,planner)")
    p.add_argument("--uplink-budget-kbps", type=float, help="adaptive run: uplink budget, kbit/s")
    p.add_argument("--p99-budget-ms", type=float, help="adaptive run: end-to-end p99 budget, ms")
    p.add_argument("--out-dir", help=f"where to write {PAGE} (default {OUT_DIR})")


def select_links(names: str | None) -> list[LinkSpec]:
    if not names:
        return list(BENCH_LINKS)
    known = {s.name: s for s in BENCH_LINKS}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown links {unknown}; known: {', '.join(known)}")
    return [known[n] for n in wanted]


def fixed_candidates(options, accuracy_floor: float | None = None):
    """The fixed splits worth measuring: per cut, the feasible codec with the fewest bytes (ends excluded)."""
    from edge_workers.split_planner import INPUT, OUTPUT, feasible

    best = {}
    for opt in options:
        if opt.cut in (INPUT, OUTPUT) or not feasible(opt, accuracy_floor):
            continue
        if opt.cut not in best or opt.bytes < best[opt.cut].bytes:
            best[opt.cut] = opt
    return list(best.values())


@dataclass(frozen=True)
class LinkChange:
    """At t_s seconds after the start of the adaptive run, the emulated link becomes `spec`."""

    t_s: float
    spec: LinkSpec


def run_adaptive(link: EmulatedLink, schedule: Sequence[LinkChange], controller, measure: Callable[[float], object],
                 apply: Callable[[object], None], duration_s: float, tick_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 progress: Progress = lambda line: None) -> AdaptiveRun:
    """Tick `controller` every tick_s for duration_s on the wall clock: measure(t) -> Measurement from the running
    pipeline, apply(decision) to the workers; change `link` per `schedule`. Returns every tick."""
    cfg = controller.config
    out = AdaptiveRun(cfg.uplink_budget_kbps, cfg.p99_budget_ms)
    pending = sorted(schedule, key=lambda c: c.t_s)
    current = link.name
    start = clock()
    for k in range(int(duration_s / tick_s) + 1):
        now = start + k * tick_s
        wait = now - clock()
        if wait > 0:
            sleep(wait)
        t = clock() - start
        while pending and pending[0].t_s <= t:
            change = pending.pop(0)
            link.set(change.spec.rate_bps, change.spec.delay_s)
            current = change.spec.name
            progress(f"adaptive: t={t:.1f} s link -> {current}")
        m = measure(t)
        d = controller.tick(m)
        if d.changed:
            apply(d)
            progress(f"adaptive: t={t:.1f} s {d.reason}: threshold {d.threshold:.3f}, "
                     f"split {_split(d.option)}, {d.mode}")
        out.points.append(AdaptivePoint(t, current, m.uplink_bytes_per_s or 0.0, m.p99_ms, d.threshold,
                                        _split(d.option), d.mode, d.reason))
    return out


def _split(option) -> str:
    return "default" if option is None else f"{option.cut} {option.codec}".strip()


def command_line(args: argparse.Namespace) -> str:
    from infra.bench import BENCHMARKS

    registered = "partition" in BENCHMARKS
    words = ["edgeq", "bench", "partition"] if registered else ["python", "-m", "infra.bench.partition"]
    if getattr(args, "quick", False):
        words.append("--quick")
    for opt in ("links", "transfer_s", "pings", "seconds", "rate", "devices", "cuts", "modes", "uplink_budget_kbps",
                "p99_budget_ms"):
        value = getattr(args, opt, None)
        if value is not None:
            words += ["--" + opt.replace("_", "-"), str(value)]
    if args.check_links_only:
        words.append("--check-links-only")
    return shlex.join(words)


def _settings(args: argparse.Namespace):
    """(transfer_s, pings, ModesConfig) from the arguments, --quick filling what is not given."""
    from infra.bench.partition_modes import ModesConfig
    from infra.bench.partition_report import MODES

    quick = QUICK if getattr(args, "quick", False) else {"seconds": 10.0, "transfer_s": 4.0, "pings": 30}
    def pick(name):
        return quick[name] if getattr(args, name, None) is None else getattr(args, name)
    modes = tuple(m.strip() for m in (getattr(args, "modes", None) or ",".join(MODES)).split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    cfg = ModesConfig(seconds=float(pick("seconds")), rate=getattr(args, "rate", None) or 100.0,
                      devices=getattr(args, "devices", None) or 4, modes=modes,
                      cuts=tuple(c.strip() for c in (getattr(args, "cuts", None) or "pool2,fc1").split(",")))
    return float(pick("transfer_s")), int(pick("pings")), cfg


def _link_notes(checks: Sequence[LinkCheck]) -> list[str]:
    return [
        ("Each link is an in-process TCP proxy on 127.0.0.1 (infra/bench/links.py): per direction a serializer "
         "at the rate followed by the one-way delay; link names give the rate and the RTT (2 x one-way delay)."),
        ("The echo's error is mostly the proxy's own cost (Python, four traversals per echo): "
         f"{min(c.rtt_s[0] - c.rtt_s[1] for c in checks) * 1e3:+.2f} to "
         f"{max(c.rtt_s[0] - c.rtt_s[1] for c in checks) * 1e3:+.2f} ms here whatever the delay."),
        "Transfers: worst error " + ", ".join(
            f"{c.name} {max(abs(LinkCheck.error(c.upload_s)), abs(LinkCheck.error(c.download_s))) * 100:.1f} %"
            for c in checks) + ".",
    ]


def _load(results, spec: LinkSpec, cfg) -> float:
    """The largest device -> edge bit rate of a mode on `spec` as a fraction of the link's rate."""
    per_frame = max((r.bytes_per_frame["device_to_edge"] for r in results if r.link == spec.name), default=0.0)
    return per_frame * 8 * cfg.rate / spec.rate_bps


def run(args: argparse.Namespace, progress: Progress) -> str:
    import tempfile

    from infra.bench.partition_modes import measure
    from infra.bench.partition_report import (
        LINK_PLOT,
        mode_table,
        plot_links,
        target_table,
        targets,
    )
    from infra.bench.report import machine_info, write_markdown

    transfer_s, pings, cfg = _settings(args)
    specs = select_links(args.links)
    load0 = os.getloadavg()[0]
    checks: list[LinkCheck] = []
    for spec in specs:
        progress(f"link {spec.name}: {pings} echoes, {transfer_s:g} s up and down")
        checks.append(check_link(spec, transfer_s, pings))
    tables = [link_check_table(checks)]
    notes = _link_notes(checks)
    images = []
    out_dir = Path(args.out_dir) if args.out_dir else OUT_DIR
    text = [tables[0].text()]
    if not args.check_links_only:
        with tempfile.TemporaryDirectory(prefix="edgeq-bench-partition-") as work:
            results = measure(specs, cfg, progress, Path(work))
        slowest = min(specs, key=lambda s: s.rate_bps).name
        fastest = max(specs, key=lambda s: s.rate_bps).name
        rows = targets(results, slowest, fastest)
        tables += [mode_table(results), target_table(rows)]
        text += [tables[1].text(), tables[2].text()]
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_links(out_dir / LINK_PLOT, results, [s.name for s in specs])
        images.append(("p50/p99 per mode and link", LINK_PLOT))
        misses = [f"{name}: {got} (required {req})" for name, req, got, met in rows if met is False]
        notes += [
            ("Emulated hop: device -> broker. The devices and the results subscriber connect to Mosquitto through "
             "the link; the edge and cloud actors connect directly, and edge -> cloud is Ray on this host "
             "(docs/partition.md, The benchmark)."),
            (f"Per mode: {cfg.devices} devices offering {cfg.rate:g} frames/s in total for {cfg.seconds:g} s, QoS 1; "
             "1 edge and 1 cloud actor started for the mode. Latency: capture -> answer, stamped by the worker "
             "that answers (the result's trip back down the link is not in it). CPU: every process under the "
             "driver but the driver (broker, Ray workers); the devices' heads and the link proxy run in the "
             "driver and are not counted."),
            (f"best-fixed-split: the lowest p99 of the fixed splits measured ({', '.join(cfg.cuts)}, "
             f"{cfg.codec}); planner: plan() on the heads/tails profiled at batch 1 (device = lower tier, edge + "
             "cloud = upper) and the link's nominal rate and RTT; its choice is run as its own mode; predicted ms "
             "is the planner's expected latency."),
            "Offered load on each link's uplink (the heaviest mode): " + ", ".join(
                f"{s.name} {_load(results, s, cfg):.0%} of its rate" for s in specs)
            + ". Below 100 % no queue builds up on the link, so all-cloud's p99 is the link's delay plus "
            "serialization, not a queue.",
            (f"Latency percentiles leave out each device's frames of the first "
             f"{min(cfg.warmup_s, cfg.seconds / 4):g} s "
             "(connections through the link, first batches); the progress lines give the p99 of all frames."),
            "Targets missed: " + ("; ".join(misses) if misses else "none of those measured") + ".",
            "Not done: " + ADAPTIVE_PENDING + ".",
        ]
    load1 = os.getloadavg()[0]
    notes.append(f"1-minute load average {load0:.1f} at the start and {load1:.1f} at the end on "
                 f"{machine_info()['cores usable / online']} cores.")
    write_markdown(out_dir / PAGE, "Split computing over emulated links", tables, machine_info(),
                   command_line(args), intro="Produced by the command below. See docs/partition.md (Emulated links, "
                   "The benchmark).", notes=notes, images=images)
    return "\n\n".join(text)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m infra.bench.partition ...`, the same as `edgeq bench partition`."""
    p = argparse.ArgumentParser(prog="python -m infra.bench.partition", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    import sys

    print(run(args, progress=lambda line: print(line, file=sys.stderr, flush=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
