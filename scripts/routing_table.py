#!/usr/bin/env python3
"""Measure confidence routing offline: how often each threshold forwards, and who is right on the forwarded frames.

Chooses nothing on the test split: the choice of the default threshold and
uplink codec is made on the validation slice of the train split (the 1,000
images the reference models did not train on); the test split's numbers are
printed for the record. Writes docs/results/routing.md.

    python scripts/routing_table.py [--thresholds 0.8,0.9,0.95] [--out docs/results/routing.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud_workers.train import TrainConfig, split_train  # noqa: E402
from edge_workers.codecs import UplinkCodec  # noqa: E402
from edge_workers.config import EdgeConfig  # noqa: E402
from edge_workers.processor import EdgeProcessor  # noqa: E402
from edge_workers.runtime import load_runtime  # noqa: E402
from publishers.datasets import load_mnist  # noqa: E402
from publishers.noise import NoiseConfig, add_noise  # noqa: E402

NOISES = (("clean", None), ("gaussian 0.2", NoiseConfig("gaussian", 0.2)),
          ("salt-and-pepper 0.1", NoiseConfig("salt-and-pepper", 0.1)))
CLOUD_MODELS = {"denoised": "cloud_cnn.onnx", "pca-int8": "cloud_pca_mlp.onnx"}


def rows(images: np.ndarray, labels: np.ndarray, thresholds: list[float]) -> list[list[str]]:
    out = []
    y = labels.astype(np.int64)
    cloud_cnn = load_runtime("onnx", REPO / "models" / "cloud_cnn.onnx")
    for name, noise in NOISES:
        x = images if noise is None else add_noise(images, noise, np.random.default_rng(7))
        only = (cloud_cnn.predict(x[:, None].astype(np.float32) / 255.0).argmax(1) == y).mean()
        for codec, model in CLOUD_MODELS.items():
            proc = EdgeProcessor(EdgeConfig(codec=codec, threshold=0.0))
            d = proc.process(x)
            codes = proc.codec.compute_codes(x, denoised=proc.denoiser.apply(x))
            pca = proc.codec.pca
            decoded = UplinkCodec(codec, pca=pca, k=proc.codec.k).decode_codes(codes)
            cloud = load_runtime("onnx", REPO / "models" / model).predict(decoded).argmax(1)
            for t in thresholds:
                fwd = d.confidences < t
                combined = np.where(fwd, cloud, d.classes)
                n = max(int(fwd.sum()), 1)
                out.append([name, codec, f"{t:.2f}", f"{100 * fwd.mean():.1f}",
                            f"{100 * (d.classes[fwd] == y[fwd]).sum() / n:.1f}",
                            f"{100 * (cloud[fwd] == y[fwd]).sum() / n:.1f}",
                            f"{100 * (d.classes == y).mean():.2f}", f"{100 * (combined == y).mean():.2f}",
                            f"{100 * only:.2f}",
                            f"{fwd.mean() * proc.codec.code_size:.1f}"])
    return out


HEADER = ["noise", "codec", "threshold", "forwarded %", "edge right on forwarded %", "cloud right on forwarded %",
          "edge-only accuracy %", "edgeq accuracy %", "cloud-only raw accuracy %", "uplink B/frame"]


def table(r: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in r])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thresholds", default="0.8,0.9,0.95")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "routing.md"))
    args = ap.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    train = load_mnist(REPO / "data" / "mnist", "train")
    _, val = split_train(train, None, TrainConfig().seed)
    test = load_mnist(REPO / "data" / "mnist", "test")
    print("[routing] validation slice of train (1,000 images) ...", file=sys.stderr)
    val_table = table(rows(val.images, val.labels, thresholds))
    print("[routing] held-out test split (3,000 images) ...", file=sys.stderr)
    test_table = table(rows(test.images, test.labels, thresholds))
    text = (
        "# Confidence routing, measured offline\n\n"
        "Produced by `python scripts/routing_table.py`. The edge model (the default: the Q-CNN of the edge CNN) "
        "classifies denoised frames; frames whose "
        "confidence (1 - normalised entropy) is below the threshold go to the cloud through the codec: `denoised` "
        "to the cloud CNN, `pca-int8` (64 B) to the MLP on PCA coefficients. Uplink bytes per frame are averaged over "
        "all frames (payload only).\n\n"
        "## Validation slice of train (used to choose the defaults)\n\n" + val_table + "\n\n"
        "## Held-out test split (reported, not used for choosing)\n\n" + test_table + "\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
