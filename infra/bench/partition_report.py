"""`edgeq bench partition` results: per-mode records, the targets, tables and plots for docs/results/partition.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infra.bench.links import LinkCheck
from infra.bench.report import Table

# The modes compared on each link, in table order.
ALL_EDGE, ALL_CLOUD, CONFIDENCE, BEST_FIXED, PLANNER = "all-edge", "all-cloud", "confidence", "best-fixed-split", \
    "planner"
MODES = (ALL_EDGE, ALL_CLOUD, CONFIDENCE, BEST_FIXED, PLANNER)
HOPS = ("device_to_edge", "edge_to_cloud", "results")
LINK_PLOT, ADAPTIVE_PLOT = "partition_latency.png", "partition_adaptive.png"


@dataclass
class ModeResult:
    """One mode on one link, measured end to end. split: "cut codec" (or "input raw", "output"); latency in ms;
    bytes_per_frame: payload bytes per answered frame on each hop of HOPS; accuracy: fraction of labelled
    frames right; cpu_us_per_frame: CPU of every edgeq process over answered frames, microseconds."""

    link: str
    mode: str
    split: str
    frames: int
    p50_ms: float
    p99_ms: float
    bytes_per_frame: dict[str, float]
    accuracy: float
    cpu_us_per_frame: float
    predicted_ms: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        missing = set(HOPS) - set(self.bytes_per_frame)
        if missing:
            raise ValueError(f"{self.link}/{self.mode}: bytes per frame missing for hops {sorted(missing)}")


@dataclass
class AdaptivePoint:
    """One control tick of the adaptive run: time since start (s), the link in force, what was measured and chosen."""

    t_s: float
    link: str
    uplink_bytes_per_s: float
    p99_ms: float | None
    threshold: float
    split: str
    mode: str
    reason: str


@dataclass
class AdaptiveRun:
    budget_kbps: float | None
    p99_budget_ms: float | None
    points: list[AdaptivePoint] = field(default_factory=list)


def _f(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def link_check_table(checks: Sequence[LinkCheck]) -> Table:
    t = Table("Emulated links against a timed transfer (in-process shaping proxy)",
              ["link", "bytes per transfer", "echo RTT ms measured / expected", "error",
               "upload s measured / expected", "error", "download s measured / expected", "error"])
    for c in checks:
        t.add(c.name, f"{c.nbytes:,}", f"{c.rtt_s[0] * 1e3:.2f} / {c.rtt_s[1] * 1e3:.2f}",
              f"{LinkCheck.error(c.rtt_s) * 100:+.1f}% ({(c.rtt_s[0] - c.rtt_s[1]) * 1e3:+.2f} ms)",
              f"{c.upload_s[0]:.3f} / {c.upload_s[1]:.3f}",
              f"{LinkCheck.error(c.upload_s) * 100:+.1f}%", f"{c.download_s[0]:.3f} / {c.download_s[1]:.3f}",
              f"{LinkCheck.error(c.download_s) * 100:+.1f}%")
    t.note = ("Expected: echo = 2 x one-way delay + serialization of the 69-byte request and 64-byte reply; "
              "transfer = 2 x delay + serialization of the bytes (plus a 1-byte ack). Median of the echoes; one "
              "transfer each way.")
    return t


def best_fixed(results: Sequence[ModeResult], link: str) -> ModeResult | None:
    """The BEST_FIXED row of `link` (the fixed split with the lowest p99, chosen by the runner)."""
    return next((r for r in results if r.link == link and r.mode == BEST_FIXED), None)


def mode_table(results: Sequence[ModeResult]) -> Table:
    t = Table("Modes per link", ["link", "mode", "split", "frames", "p50 ms", "p99 ms", "predicted ms",
                                 *(f"B/frame {h}" for h in HOPS), "accuracy %", "CPU us/frame"])
    for r in results:
        t.add(r.link, r.mode, r.split, r.frames, _f(r.p50_ms), _f(r.p99_ms), _f(r.predicted_ms),
              *(_f(r.bytes_per_frame[h]) for h in HOPS), _f(r.accuracy * 100, 2), _f(r.cpu_us_per_frame, 0))
    return t


def targets(results: Sequence[ModeResult], slowest: str, fastest: str,
            adaptive: AdaptiveRun | None = None) -> list[tuple[str, str, str, bool | None]]:
    """(target, required, measured, met) for the issue's benchmark targets; met None when not measured."""
    by = {(r.link, r.mode): r for r in results}
    out = []

    def row(name, required, value_fn):
        try:
            measured, met = value_fn()
        except KeyError:
            measured, met = "not measured", None
        out.append((name, required, measured, met))

    def slow_vs_cloud():
        p, c = by[(slowest, PLANNER)].p99_ms, by[(slowest, ALL_CLOUD)].p99_ms
        return f"{c / p:.2f}x ({p:.1f} vs {c:.1f} ms)", c / p >= 2.0

    def slow_vs_fixed():
        p, f = by[(slowest, PLANNER)].p99_ms, by[(slowest, BEST_FIXED)].p99_ms
        return f"{p / f - 1:+.1%} ({p:.1f} vs {f:.1f} ms)", p <= 1.1 * f

    def fast_vs_ends():
        p = by[(fastest, PLANNER)].p99_ms
        best = min(by[(fastest, ALL_EDGE)].p99_ms, by[(fastest, ALL_CLOUD)].p99_ms)
        return f"{p / best - 1:+.1%} ({p:.1f} vs {best:.1f} ms)", p <= 1.1 * best

    row(f"planner p99 vs all-cloud on {slowest}", ">= 2x lower", slow_vs_cloud)
    row(f"planner p99 vs best fixed split on {slowest}", "<= +10 %", slow_vs_fixed)
    row(f"planner p99 vs best of all-edge/all-cloud on {fastest}", "<= +10 %", fast_vs_ends)
    if adaptive is not None and adaptive.budget_kbps is not None and adaptive.points:
        budget = adaptive.budget_kbps * 1000 / 8
        peak = max(p.uplink_bytes_per_s for p in adaptive.points[len(adaptive.points) // 10:])
        out.append(("adaptive run: uplink under the budget", f"<= {budget:,.0f} B/s",
                    f"peak {peak:,.0f} B/s after the first tenth", peak <= budget))
    else:
        out.append(("adaptive run: uplink under the budget", "<= budget", "not measured", None))
    return out


def target_table(rows) -> Table:
    t = Table("The issue's targets", ["target", "required", "measured", "met"])
    for name, req, got, met in rows:
        t.add(name, req, got, "n/a" if met is None else ("yes" if met else "NO"))
    return t


def plot_links(path: Path, results: Sequence[ModeResult], links: Sequence[str]) -> Path:
    """p50 (bar) and p99 (whisker) per mode, one group per link, log latency axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r.link, r.mode): r for r in results}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(MODES)
    for j, mode in enumerate(MODES):
        xs = [i + (j - len(MODES) / 2 + 0.5) * width for i, link in enumerate(links) if (link, mode) in by]
        rows = [by[(link, mode)] for link in links if (link, mode) in by]
        ax.bar(xs, [r.p50_ms for r in rows], width, label=mode)
        ax.errorbar(xs, [r.p50_ms for r in rows], yerr=[[0] * len(rows), [r.p99_ms - r.p50_ms for r in rows]],
                    fmt="none", ecolor="k", capsize=2, lw=0.8)
    ax.set_xticks(range(len(links)), links)
    ax.set_yscale("log")
    ax.set_ylabel("capture -> result latency, ms (bar p50, whisker p99)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_adaptive(path: Path, run: AdaptiveRun) -> Path:
    """Over time: uplink vs its budget, p99 vs its budget, the threshold, and the split (the link shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = run.points
    t = [p.t_s for p in pts]
    fig, axes = plt.subplots(4, 1, figsize=(8, 8.5), sharex=True)
    axes[0].plot(t, [p.uplink_bytes_per_s / 1e3 for p in pts], label="uplink kB/s")
    if run.budget_kbps is not None:
        axes[0].axhline(run.budget_kbps / 8, color="r", ls=":", label="budget")
    axes[0].set_ylabel("uplink kB/s")
    axes[1].plot(t, [p.p99_ms if p.p99_ms is not None else float("nan") for p in pts], label="p99 ms")
    if run.p99_budget_ms is not None:
        axes[1].axhline(run.p99_budget_ms, color="r", ls=":", label="budget")
    axes[1].set_ylabel("p99 ms")
    axes[2].step(t, [p.threshold for p in pts], where="post", label="threshold")
    axes[2].set_ylabel("threshold")
    splits = sorted({p.split for p in pts} | {"edge-only"})
    axes[3].step(t, [splits.index("edge-only" if p.mode == "edge-only" else p.split) for p in pts], where="post",
                 color="tab:orange", label="split in force")
    axes[3].set_yticks(range(len(splits)), splits, fontsize=7)
    axes[3].set_xlabel("time, s")
    changes = [i for i in range(1, len(pts)) if pts[i].link != pts[i - 1].link]
    for ax in axes:
        for i in changes:
            ax.axvline(pts[i].t_s, color="k", lw=0.6)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    for i in [0] + changes:
        axes[0].annotate(pts[i].link, (pts[i].t_s, 0), xytext=(2, 2), textcoords="offset points", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
