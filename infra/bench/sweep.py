"""The Q-CNN K x dsub sweep and the mixed-settings frontier: points, tables, accuracy-vs-compression plots (Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.bench.report import Table


@dataclass(frozen=True)
class SweepPoint:
    """One compressed model. K: codewords per subspace; dsub: sub-dimension; accuracy: top-1 in [0, 1]."""

    k: int
    dsub: int
    error_correction: bool
    file_bytes: int
    accuracy: float


def sweep_table(points: Sequence[SweepPoint], float_bytes: int, float_accuracy: float) -> Table:
    """One row per (K, dsub): compression and accuracy with k-means and with error correction."""
    t = Table("Sweep over K and dsub (edge CNN, conv and FC layers alike)",
              ["K", "dsub", "file bytes (EC)", "compression ×", "k-means acc. %", "EC acc. %", "EC Δ points"],
              note="Δ = EC accuracy - float accuracy (percentage points).")
    by_key = {(p.k, p.dsub, p.error_correction): p for p in points}
    for k, dsub in sorted({(p.k, p.dsub) for p in points}):
        km, ec = by_key.get((k, dsub, False)), by_key.get((k, dsub, True))
        main = ec or km
        t.add(k, dsub, f"{main.file_bytes:,}", f"{float_bytes / main.file_bytes:.2f}",
              "n/a" if km is None else f"{100 * km.accuracy:.2f}", "n/a" if ec is None else f"{100 * ec.accuracy:.2f}",
              "n/a" if ec is None else f"{100 * (ec.accuracy - float_accuracy):+.2f}")
    return t


def plot_sweep(
    path: str | Path, points: Sequence[SweepPoint], float_bytes: int, refs: Sequence[tuple[str, float, float]] = ()
) -> Path:
    """Accuracy (%) vs compression ratio (log x), one line per (dsub, EC or k-means), points labelled by K.

    refs: (name, compression ratio, accuracy in [0, 1]) drawn as single labelled markers (float, int8, ...).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, dsub in enumerate(sorted({p.dsub for p in points})):
        for ec in (False, True):
            line = sorted((p for p in points if p.dsub == dsub and p.error_correction == ec), key=lambda p: p.k)
            if not line:
                continue
            xs = [float_bytes / p.file_bytes for p in line]
            ys = [100 * p.accuracy for p in line]
            ax.plot(xs, ys, "-o" if ec else "--s", color=colors[i % len(colors)], alpha=1.0 if ec else 0.6,
                    label=f"dsub={dsub}, {'EC' if ec else 'k-means'}")
            if ec:
                for x, y, p in zip(xs, ys, line, strict=True):
                    ax.annotate(f"K={p.k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for j, (name, ratio, acc) in enumerate(r for r in refs if not r[0].startswith("Q-CNN")):
        ax.plot([ratio], [100 * acc], marker="*^"[j % 2], markersize=11, linestyle="none", color="black",
                label=f"{name} ({100 * acc:.2f} %)")
    ax.set_xscale("log")
    ratio_fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×")
    ax.xaxis.set_major_formatter(ratio_fmt)
    ax.xaxis.set_minor_formatter(ratio_fmt)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("compression ratio (float file bytes / model file bytes)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Q-CNN on the edge CNN: accuracy vs compression")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class FrontierPoint:
    """One compressed model of the size/accuracy frontier. accuracy: top-1 in [0, 1] on the held-out split."""

    name: str
    file_bytes: int
    accuracy: float


def pareto(points: Sequence[FrontierPoint]) -> list[FrontierPoint]:
    """The points no other point beats on both size (smaller) and accuracy (higher), smallest first."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p.file_bytes, -p.accuracy)):
        if p.accuracy > best:
            front.append(p)
            best = p.accuracy
    return front


def frontier_table(points: Sequence[FrontierPoint], float_bytes: int, float_accuracy: float) -> Table:
    t = Table("Size/accuracy frontier (edge CNN, error correction, mixed settings)",
              ["settings", "file bytes", "compression ×", "accuracy %", "Δ points", "on the frontier"],
              note="Δ = accuracy - float accuracy (percentage points); on the frontier = no other row is both "
                   "smaller and more accurate.")
    front = set(pareto(points))
    for p in sorted(points, key=lambda p: p.file_bytes):
        t.add(p.name, f"{p.file_bytes:,}", f"{float_bytes / p.file_bytes:.2f}", f"{100 * p.accuracy:.2f}",
              f"{100 * (p.accuracy - float_accuracy):+.2f}", "yes" if p in front else "")
    return t


def plot_frontier(path: str | Path, points: Sequence[FrontierPoint], float_bytes: int, float_accuracy: float,
                  min_ratio: float = 20.0) -> Path:
    """Accuracy (%) vs compression ratio: every point labelled, the Pareto front as a line, the float accuracy and
    the 0.5-point / min_ratio target region marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    xs = [float_bytes / p.file_bytes for p in points]
    ax.plot(xs, [100 * p.accuracy for p in points], "o", color="tab:blue")
    for x, p in zip(xs, points, strict=True):
        ax.annotate(p.name, (x, 100 * p.accuracy), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto(points)
    ax.plot([float_bytes / p.file_bytes for p in front], [100 * p.accuracy for p in front], "-", color="tab:blue",
            alpha=0.6, label="frontier (error correction)")
    ax.axhline(100 * float_accuracy, color="black", linestyle=":", label=f"float ({100 * float_accuracy:.2f} %)")
    ax.axhline(100 * float_accuracy - 0.5, color="tab:red", linestyle="--", alpha=0.6, label="float - 0.5 points")
    ax.axvline(min_ratio, color="tab:red", linestyle="-.", alpha=0.6, label=f"{min_ratio:g}× smaller")
    ax.set_xlabel("compression ratio (float file bytes / model file bytes)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Q-CNN on the edge CNN: size/accuracy frontier")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
