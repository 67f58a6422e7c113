"""The import graph: each layer imports only the layers below it, and no modules import each other in a circle.

The order, lowest first, is written once, in LAYERS. A device installs only the bottom layer.
Imports inside functions count too: a lazy import is still a dependency, it only moves the failure to
run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A package may import its own layer and any layer before it, never one after it.
LAYERS = (
    "publishers",     # devices and the device protocol: wire format, topics, result messages, MQTT session
    "modelstore",     # the reference models shared by the tiers: files, manifest, input convention, evaluation
    "edge_workers",   # ingest, preprocessing, codecs, model runtimes, the edge worker
    "cloud_workers",  # the bigger models, their training, the cloud worker
    "infra",          # how the system is stood up: config, broker, cluster, CLI, demo, benchmarks
)
RANK = {pkg: i for i, pkg in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in LAYERS for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` (at `path`) imports, anywhere in the file; `from pkg import sub` names pkg.sub."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in known else mod for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] in RANK)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imported_modules(name, path, set(mods)) for name, path in mods.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} imports {dst} ({dst.split('.')[0]} is above {src.split('.')[0]})"
                  for src, dsts in graph.items() for dst in dsts
                  if RANK[dst.split(".")[0]] > RANK[src.split(".")[0]])


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_package_of_the_project_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "scripts"}
    assert packages == set(LAYERS)


def test_no_layer_imports_a_layer_above_it():
    assert upward_imports(import_graph()) == []


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_the_checks_catch_an_upward_import_and_a_circle():
    graph = {"publishers.device": {"edge_workers.results"}, "edge_workers.results": set(),
             "infra.a": {"infra.b"}, "infra.b": {"infra.a"}}
    assert upward_imports(graph) == ["publishers.device imports edge_workers.results "
                                     "(edge_workers is above publishers)"]
    assert circles(graph) == [["infra.a", "infra.b"]]


@pytest.mark.parametrize("source, expected", [
    ("from edge_workers import results", {"edge_workers.results"}),  # a submodule
    ("from edge_workers import EdgeConfig", {"edge_workers"}),  # a name of the package
    ("def f():\n    import cloud_workers.train", {"cloud_workers.train"}),  # lazy imports count
    ("from . import wire", {"publishers.wire"}),
    ("import numpy", set()),
])
def test_imports_are_read_from_the_source(tmp_path, source, expected):
    path = tmp_path / "mod.py"
    path.write_text(source + "\n")
    known = {"publishers", "publishers.wire", "edge_workers", "edge_workers.results", "cloud_workers.train"}
    assert imported_modules("publishers.mod", path, known) == expected
