"""Options of `edgeq experiment edge-learning` and running it (the default sweep, or --full)."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace

from edge_workers.config import CODECS
from publishers.errors import ConfigError
from publishers.run import Progress

DEFAULT_OUT = "docs/results/edge-learning.md"
# --full: more PCA sizes, more training-set sizes, both noise kinds (about 3x the default's time).
FULL = {"pca_sizes": (8, 16, 32, 48, 64, 96, 128), "train_sizes": (100, 300, 1000, 2000, 5000, 0),
        "noise": ("none", "gaussian", "salt-and-pepper")}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    e = sub.add_parser(
        "edge-learning", help="learning in the cloud on edge-reduced data (Huang et al., ICNP 2017)",
        description="Devices publish the train and test splits through a real broker; edge workers denoise and "
        "encode them per uplink codec; cloud workers fit an MLP on nested training subsets and score it on the "
        "held-out frames. Writes a table and PNG plots to docs/results/edge-learning.md (needs edgeq[server,bench]).")
    e.add_argument("--codecs", dest="exp_codecs", metavar="CODECS", type=_names,
                   help=f"comma-separated codecs (default {','.join(CODECS)})")
    e.add_argument("--pca-sizes", dest="exp_pca_sizes", metavar="K,...", type=_ints,
                   help="PCA k for the pca-* codecs (default 16,32,64)")
    e.add_argument("--train-sizes", dest="exp_train_sizes", metavar="N,...", type=_ints,
                   help="training-set sizes, 0 = the whole train split (default 300,1000,3000,0)")
    e.add_argument("--noise", dest="exp_noise", metavar="NOISE,...", type=_names,
                   help="sensor noise settings: none, gaussian, salt-and-pepper (default none,gaussian)")
    e.add_argument("--noise-level", dest="exp_noise_level", metavar="LEVEL", type=float,
                   help="noise level (default 0.2)")
    e.add_argument("--data-dir", dest="exp_data_dir", metavar="DIR",
                   help="MNIST IDX directory (default data/mnist; full MNIST works)")
    e.add_argument("--models-dir", dest="exp_models_dir", metavar="DIR",
                   help="models directory with pca.npz (default models/)")
    e.add_argument("--devices", dest="exp_devices", metavar="N", type=int, help="simulated devices (default 4)")
    e.add_argument("--max-epochs", dest="exp_max_epochs", metavar="N", type=int, help="MLP epochs at most (default 30)")
    e.add_argument("--no-serve-check", dest="exp_serve_check", action="store_false", default=None,
                   help="skip answering the test split with the learned models on the frames topic")
    e.add_argument("--full", action="store_true", help="the bigger sweep: " + ", ".join(
        f"{k}={','.join(map(str, v))}" for k, v in FULL.items()))
    e.add_argument("--out", default=DEFAULT_OUT, help=f"results page (default {DEFAULT_OUT}; plots next to it)")


def build_config(args: argparse.Namespace):
    from infra.experiment import EdgeLearningConfig

    cfg = EdgeLearningConfig(**(FULL if args.full else {}))
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("exp_") and v is not None}
    try:
        return replace(cfg, **given)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err


def run(args: argparse.Namespace, progress: Progress) -> int:
    from infra.experiment import run_edge_learning
    from infra.experiment_report import tables, write_report

    cfg = build_config(args)
    result = run_edge_learning(cfg, progress)
    command = "edgeq experiment " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("experiment") + 1:]) \
        if "experiment" in sys.argv else "edgeq experiment edge-learning"
    path = write_report(result, args.out, command)
    for t in tables(result):
        print(t.text(), end="\n\n")
    print(f"wrote {path} ({result.seconds:.0f} s)")
    return 0
