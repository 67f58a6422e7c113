"""Benchmark result tables: aligned text for stdout, Markdown for docs/results, and the machine description."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

# Packages whose versions a result depends on; missing ones are reported as "not installed".
VERSIONED = ("onnxruntime", "numpy", "onnx", "numba", "onnxruntime-extensions")


@dataclass
class Table:
    """One result table. rows: one sequence of already formatted cells per row, len == len(headers)."""

    title: str
    headers: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    note: str = ""

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"table {self.title!r} has {len(self.headers)} columns, row has {len(cells)}: {cells}")
        self.rows.append([str(c) for c in cells])

    def text(self) -> str:
        """Aligned plain text (title, header, rule, rows, note)."""
        cells = [list(self.headers)] + [list(r) for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.headers))]
        right = [_numeric_column([r[i] for r in cells[1:]]) for i in range(len(self.headers))]
        lines = [self.title]
        for j, row in enumerate(cells):
            lines.append("  ".join(c.rjust(w) if r else c.ljust(w)
                                   for c, w, r in zip(row, widths, right, strict=True)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def markdown(self) -> str:
        """A GitHub-flavoured Markdown table under a level-3 heading."""
        esc = [[c.replace("|", "\\|") for c in r] for r in [list(self.headers)] + [list(r) for r in self.rows]]
        align = ["---:" if _numeric_column([r[i] for r in esc[1:]]) else "---" for i in range(len(esc[0]))]
        lines = [f"### {self.title}", "", "| " + " | ".join(esc[0]) + " |", "| " + " | ".join(align) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)


def _numeric_column(cells: Sequence[str]) -> bool:
    """Right-align a column whose cells are all numbers or "n/a" (and at least one number)."""
    given = [c for c in cells if c.strip() != "n/a"]
    return bool(given) and all(_numeric(c) for c in given)


def _numeric(cell: str) -> bool:
    s = cell.strip().rstrip("×%").replace(",", "").lstrip("+-")
    try:
        float(s)
    except ValueError:
        return False
    return True


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (first `model name` line), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity), which is what thread pinning can use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict[str, str]:
    """What a reader needs to compare timings: CPU, cores, OS, Python and library versions, date."""
    info = {
        "CPU": cpu_model(),
        "cores usable / online": f"{usable_cores()} / {os.cpu_count()}",
        "OS": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "Python": platform.python_version(),
    }
    for name in VERSIONED:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "not installed"
    info["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return info


def write_markdown(
    path: str | Path,
    title: str,
    tables: Sequence[Table],
    machine: dict[str, str],
    command: str,
    intro: str = "",
    notes: Sequence[str] = (),
    images: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write a results page: title, intro, command, machine, tables, images (alt, relative path), notes."""
    parts = [f"# {title}", ""]
    if intro:
        parts += [intro, ""]
    parts += ["## How this was made", "", "```", command, "```", ""]
    parts += ["| machine | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in machine.items()] + [""]
    parts += ["## Results", ""]
    for t in tables:
        parts += [t.markdown(), ""]
    for alt, rel in images:
        parts += [f"![{alt}]({rel})", ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
