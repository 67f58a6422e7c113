#!/usr/bin/env python
"""Select the edge preprocessing defaults (denoise constants, cloud PCA k) on the train split's validation slice.

Never tunes on data/mnist test: every choice below is made on the 1,000-image
validation slice that the reference CNNs did not train on
(`cloud_workers.train.split_train(train, None, seed)` with TrainConfig's seed;
the PCA is fitted on the other 9,000, as `fit_reduction_models` does). With
``--test`` the chosen settings are then evaluated once on the held-out test
split, for reporting only.

Rules (stated here so that a rerun gives the same answer):

- Denoise: primary criterion is the edge CNN's validation accuracy on the
  denoised frames, averaged over the noise kinds clean / gaussian / salt-and-pepper
  (salt-and-pepper = mean of its two levels). Every configuration within
  ``--acc-tol`` points of the best is a candidate; among candidates the lowest
  mean MSE to the clean frame (same averaging) wins. Constants the winning
  method does not use are taken from the best row of the method that uses them
  (gate_mse and components from ``auto``).
- Cloud PCA k: the smallest k whose validation accuracy (denoise+pca+int8,
  averaged as above) is within ``--k-tol`` points of the best k, with
  k <= ``--max-bytes`` (pca-int8 sends k bytes per frame).

Usage: python scripts/select_preprocessing.py [--test] [--write docs/results/preprocessing.md]
Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud_workers.pca_model import (
    MLP_FILE,
    PCA_K_MAX,
    fit_reduction_models,
    onnx_mlp_logits,
    pipeline_coefficients,
)
from cloud_workers.train import TrainConfig, split_train
from edge_workers.codecs import UplinkCodec
from edge_workers.denoise import METHODS, DenoiseConfig, Denoiser
from edge_workers.reduce import PCA_FILE, PCAModel, fit_pca
from edge_workers.runtime import load_runtime
from publishers.datasets import load_mnist
from publishers.noise import NoiseConfig, add_noise

CONDITIONS = {
    "clean": NoiseConfig("none", 0.0),
    "gauss 0.2": NoiseConfig("gaussian", 0.2),
    "s&p 0.05": NoiseConfig("salt-and-pepper", 0.05),
    "s&p 0.1": NoiseConfig("salt-and-pepper", 0.1),
}
KIND_OF = {"clean": "clean", "gauss 0.2": "gaussian", "s&p 0.05": "s&p", "s&p 0.1": "s&p"}


def progress(msg: str) -> None:
    print(f"[select {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def kind_mean(values: dict[str, float], conditions=CONDITIONS) -> float:
    """Mean over noise kinds (clean, gaussian, s&p), each kind the mean of its levels."""
    kinds: dict[str, list[float]] = {}
    for name in conditions:
        kinds.setdefault(KIND_OF[name], []).append(values[name])
    return float(np.mean([np.mean(v) for v in kinds.values()]))


@dataclass
class EvalSet:
    """uint8 frames per condition [R*N, 28, 28] (R noise draws of the same N images), with clean targets and labels."""

    frames: dict[str, np.ndarray]
    clean: np.ndarray   # float32 [R*N, 28, 28] in [0, 1]
    labels: np.ndarray  # int64 [R*N]


def make_eval_set(images: np.ndarray, labels: np.ndarray, repeats: int, seed: int) -> tuple[EvalSet, int]:
    """Noisy copies of `images` for each condition; noise draw r uses rng([seed, c, r]) (reproducible)."""
    frames = {}
    for c, (name, cfg) in enumerate(CONDITIONS.items()):
        reps = 1 if not cfg.enabled else repeats
        draws = [add_noise(images, cfg, np.random.default_rng([seed, c, r])) for r in range(reps)]
        frames[name] = np.concatenate(draws)
    n = len(images)
    return EvalSet(frames, images / np.float32(255.0), np.asarray(labels, dtype=np.int64)), n


def grid_configs(args) -> list[DenoiseConfig]:
    """The denoise grid: every method in METHODS, with only the constants it uses varied."""
    d = DenoiseConfig()
    out = []
    for method in METHODS:
        uses_thr = method.startswith("impulse") or method == "auto"
        uses_k = method.endswith("pca") or method == "auto"
        thrs = args.thresholds if uses_thr else [d.impulse_threshold]
        comps = args.components if uses_k else [d.components]
        gates = args.gates if method == "auto" else [d.gate_mse]
        out += [DenoiseConfig(method, k, t, g) for t, k, g in itertools.product(thrs, comps, gates)]
    return out


def label(cfg: DenoiseConfig) -> str:
    parts = [cfg.method]
    if cfg.method.startswith("impulse") or cfg.method == "auto":
        parts.append(f"thr={cfg.impulse_threshold}")
    if cfg.needs_pca:
        parts.append(f"k={cfg.components}")
    if cfg.method == "auto":
        parts.append(f"gate={cfg.gate_mse:g}")
    return " ".join(parts)


def evaluate_denoise(cfg: DenoiseConfig, pca: PCAModel, rt, es: EvalSet, n: int) -> dict[str, dict[str, float]]:
    """MSE to clean (pixels/255 units squared) and edge CNN accuracy (fraction) per condition."""
    den = Denoiser(cfg, pca)
    mse, acc = {}, {}
    for name, frames in es.frames.items():
        reps = len(frames) // n
        out = np.concatenate([den.apply(frames[i : i + 4096]) for i in range(0, len(frames), 4096)])
        mse[name] = float(np.mean((out - np.tile(es.clean, (reps, 1, 1))) ** 2))
        logits = np.concatenate([rt.predict(out[i : i + 2048, None]) for i in range(0, len(out), 2048)])
        acc[name] = float(np.mean(logits.argmax(axis=1) == np.tile(es.labels, reps)))
    return {"mse": mse, "acc": acc}


def select_denoise(rows: list[tuple[DenoiseConfig, dict]], tol: float) -> tuple[DenoiseConfig, DenoiseConfig]:
    """(winner, final DenoiseConfig with unused constants filled from the best ``auto`` row); see the module rules."""

    def key(row):  # best accuracy first, then lowest MSE
        return (-kind_mean(row[1]["acc"]), kind_mean(row[1]["mse"]))

    best_acc = max(kind_mean(r[1]["acc"]) for r in rows)
    cands = [r for r in rows if kind_mean(r[1]["acc"]) >= best_acc - tol / 100 - 1e-12]
    winner = min(cands, key=lambda r: kind_mean(r[1]["mse"]))[0]
    best_auto = min((r for r in rows if r[0].method == "auto"), key=key)[0]
    uses_thr = winner.method.startswith("impulse") or winner.method == "auto"
    final = DenoiseConfig(
        method=winner.method,
        components=winner.components if winner.needs_pca else best_auto.components,
        impulse_threshold=winner.impulse_threshold if uses_thr else best_auto.impulse_threshold,
        gate_mse=winner.gate_mse if winner.method == "auto" else best_auto.gate_mse,
    )
    return winner, final


def denoise_table(rows, title: str) -> str:
    names = list(CONDITIONS)
    head = ("| config | " + " | ".join(f"acc {c}" for c in names) + " | acc mean | "
            + " | ".join(f"MSE {c}" for c in names[1:]) + " | MSE clean | MSE mean |")
    lines = [f"**{title}**", "", head, "|" + "---|" * (len(names) * 2 + 3)]
    for cfg, r in rows:
        accs = " | ".join(f"{100 * r['acc'][c]:.2f}" for c in names)
        mses = " | ".join(f"{r['mse'][c]:.4f}" for c in names[1:])
        lines.append(f"| {label(cfg)} | {accs} | {100 * kind_mean(r['acc']):.2f} | {mses} | "
                     f"{r['mse']['clean']:.5f} | {kind_mean(r['mse']):.4f} |")
    return "\n".join(lines)


def pca_accuracy(models_dir: Path, k: int, denoise: DenoiseConfig, es: EvalSet, n: int) -> dict[str, float]:
    """Cloud PCA MLP accuracy per condition through denoise+pca+int8, with the models in `models_dir`."""
    pca = PCAModel.load(models_dir / PCA_FILE)
    den = Denoiser(DenoiseConfig(**{**asdict(denoise), "components": min(denoise.components, pca.k_max)}), pca)
    codec = UplinkCodec("pca-int8", denoiser=den, pca=pca, k=k)
    acc = {}
    for name, frames in es.frames.items():
        logits = onnx_mlp_logits(models_dir / MLP_FILE, pipeline_coefficients(frames, den, codec))
        acc[name] = float(np.mean(logits.argmax(axis=1) == np.tile(es.labels, len(frames) // n)))
    return acc


def k_table(results: dict[int, dict[str, float]], title: str) -> str:
    names = list(CONDITIONS)
    lines = [f"**{title}**", "", "| k (B/frame) | " + " | ".join(names) + " | mean |", "|" + "---|" * (len(names) + 2)]
    for k, acc in results.items():
        cells = " | ".join(f"{100 * acc[c]:.2f}" for c in names)
        lines.append(f"| {k} | {cells} | {100 * kind_mean(acc):.2f} |")
    return "\n".join(lines)


def select_k(results: dict[int, dict[str, float]], tol: float, max_bytes: int) -> int:
    ok = {k: kind_mean(a) for k, a in results.items() if k <= max_bytes}
    best = max(ok.values())
    return min(k for k, a in ok.items() if a >= best - tol / 100 - 1e-12)


def parse_args(argv=None) -> argparse.Namespace:
    def ints(s):
        return [int(v) for v in s.split(",")]

    def floats(s):
        return [float(v) for v in s.split(",")]

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(ROOT / "data" / "mnist"))
    p.add_argument("--models-dir", default=str(ROOT / "models"), help="where edge_cnn.onnx is read from")
    p.add_argument("--seed", type=int, default=TrainConfig().seed, help="split seed (TrainConfig default)")
    p.add_argument("--repeats", type=int, default=3, help="noise draws per noisy condition")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--thresholds", type=ints, default=[96, 160, 224])
    p.add_argument("--components", type=ints, default=[96, 144])
    p.add_argument("--gates", type=floats, default=[0.008, 0.012, 0.016])
    p.add_argument("--acc-tol", type=float, default=0.1, help="denoise: accuracy tolerance, points")
    p.add_argument("--ks", type=ints, default=[32, 48, 64])
    p.add_argument("--k-tol", type=float, default=0.3, help="k: accuracy tolerance, points")
    p.add_argument("--max-bytes", type=int, default=64)
    p.add_argument("--skip-k", action="store_true", help="skip the cloud PCA k sweep (trains one MLP per k)")
    p.add_argument("--test", action="store_true", help="also report the chosen settings on the test split")
    p.add_argument("--write", default="", help="also write the tables (markdown) to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    models_dir = Path(args.models_dir)
    fit, val = split_train(load_mnist(args.data_dir, "train"), None, args.seed)
    progress(f"split seed {args.seed}: fit {len(fit)}, val {len(val)}; fitting PCA k_max={PCA_K_MAX} on fit")
    pca = fit_pca(fit.images, PCA_K_MAX, seed=args.seed)  # as fit_reduction_models; same basis as models/pca.npz
    rt = load_runtime("onnx", models_dir / "edge_cnn.onnx", threads=args.threads)
    val_set, n = make_eval_set(val.images, val.labels, args.repeats, args.seed)

    configs = grid_configs(args)
    rows = []
    for i, cfg in enumerate(configs, 1):
        rows.append((cfg, evaluate_denoise(cfg, pca, rt, val_set, n)))
        progress(f"denoise {i}/{len(configs)} {label(cfg)}: acc mean {100 * kind_mean(rows[-1][1]['acc']):.2f} %")
    winner, chosen = select_denoise(rows, args.acc_tol)
    best_per_method = [min((r for r in rows if r[0].method == m),
                           key=lambda r: (-kind_mean(r[1]["acc"]), kind_mean(r[1]["mse"]))) for m in METHODS]
    rows_sorted = sorted(rows, key=lambda r: (-kind_mean(r[1]["acc"]), kind_mean(r[1]["mse"])))

    out = [(f"Validation slice: split_train(train, None, seed={args.seed}) -> fit {len(fit)}, val {len(val)} "
           f"(the CNNs' early-stopping slice); {args.repeats} noise draws per noisy condition "
           f"({args.repeats * n} frames), clean {n}. Accuracy in %, MSE in (pixels/255)^2. 'mean' = mean over "
           "kinds clean / gaussian / s&p (s&p = mean of its two levels)."), ""]
    title = "Validation, best configuration per method (edge CNN on denoised frames)"
    out += [denoise_table(best_per_method, title), ""]
    out += [denoise_table(rows_sorted[:15], "Validation, top 15 of the grid"), ""]
    defaults = DenoiseConfig()
    old = [r for r in rows if r[0] == defaults]
    if old:
        out += [denoise_table(old, "Validation, DenoiseConfig() as committed"), ""]
    out += [(f"Rule: candidates within {args.acc_tol:g} points of the best mean accuracy, then lowest mean MSE. "
            f"Winner: `{label(winner)}`. Chosen DenoiseConfig: {asdict(chosen)}."), ""]
    progress(f"chosen denoise: {asdict(chosen)}")

    k_val: dict[int, dict[str, float]] = {}
    chosen_k = None
    with tempfile.TemporaryDirectory() as tmp:  # the k sweep's models, reused for the test report
        if not args.skip_k:
            for k in args.ks:
                progress(f"k sweep: training cloud PCA MLP for k={k} (fit slice, denoise {chosen.method})")
                fit_reduction_models(args.data_dir, Path(tmp) / f"k{k}", components=k, seed=args.seed,
                                     denoise=chosen, progress=lambda m: progress(m) if "epoch" not in m else None)
                k_val[k] = pca_accuracy(Path(tmp) / f"k{k}", k, chosen, val_set, n)
                progress(f"k={k}: val acc mean {100 * kind_mean(k_val[k]):.2f} %")
            chosen_k = select_k(k_val, args.k_tol, args.max_bytes)
            out += [k_table(k_val, f"Validation, cloud PCA MLP through denoise({chosen.method})+pca+int8"), "",
                    (f"Rule: smallest k <= {args.max_bytes} B/frame within {args.k_tol:g} points of the best mean "
                    f"validation accuracy. Chosen k = {chosen_k}. (The MLP's early stopping also watches this "
                    "slice, clean + sensor noise, so these numbers are slightly optimistic for every k alike.)"), ""]
            progress(f"chosen k: {chosen_k}")

        if args.test:
            test = load_mnist(args.data_dir, "test")
            test_set, nt = make_eval_set(test.images, test.labels, 1, args.seed)
            out += ["---", "", (f"## Held-out test split ({nt} images, 1 noise draw): reporting only, "
                    "not used to choose"), ""]
            cfgs = {label(c): c for c in (DenoiseConfig("none"), chosen, defaults)}  # deduplicated, in order
            uniq = [(cfg, evaluate_denoise(cfg, pca, rt, test_set, nt)) for cfg in cfgs.values()]
            title = "Test, edge CNN: no denoising, the chosen setting, DenoiseConfig() as committed"
            out += [denoise_table(uniq, title), ""]
            if chosen_k is not None:
                k_test = {chosen_k: pca_accuracy(Path(tmp) / f"k{chosen_k}", chosen_k, chosen, test_set, nt)}
                out += [k_table(k_test, "Test, cloud PCA MLP at the chosen k"), ""]

    text = "\n".join(out)
    print(text)
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        cmd = "python scripts/select_preprocessing.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.write).write_text(f"# Preprocessing selection\n\nGenerated by `{cmd.strip()}`.\n\n{text}\n")
        progress(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
