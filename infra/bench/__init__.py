"""`edgeq bench BENCHMARK`: the registry of benchmarks; each writes its tables under docs/results/.

A benchmark is a module with ``add_arguments(parser)`` and
``run(args, progress) -> str`` (the text printed to stdout). Register a new
one by adding it to :data:`BENCHMARKS`; the CLI needs no change. Benchmark
modules import only the standard library and numpy at top level, so building
the CLI parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "qcnn": ("infra.bench.qcnn", "Q-CNN vs float and int8 onnxruntime: size, accuracy, latency, K/dsub sweep"),
    "pipeline": ("infra.bench.pipeline", "edgeq vs cloud-only vs the MQTT ceiling: frames/s, latency, CPU, bytes"),
    "partition": ("infra.bench.partition", ("split computing over emulated links: all-edge, all-cloud, confidence, "
                                            "fixed splits, the planner's choice; p50/p99, bytes, accuracy, CPU")),
    "chaos": ("infra.bench.chaos", "a fixed stream through broker restarts and actor kills: sent, answered, lost"),
}


def add_parsers(parser: argparse.ArgumentParser) -> None:
    """Add one sub-parser per registered benchmark to the `bench` parser."""
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module, help_) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(p)


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> str:
    """Run the benchmark named by ``args.benchmark``; returns its stdout text."""
    try:
        module, _ = BENCHMARKS[args.benchmark]
    except KeyError:
        raise ValueError(f"unknown benchmark {args.benchmark!r}; available: {', '.join(BENCHMARKS)}") from None
    return importlib.import_module(module).run(args, progress)
