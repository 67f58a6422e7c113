"""Held-out accuracy of a reference model: top-1 on labelled images, clean and with the manifest's sensor noise."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from modelstore.interface import EVAL_SEED, NOISY_KEY, noisy_copy, to_input
from publishers.datasets import LabelledImages
from publishers.errors import EdgeqError

MISSING_ORT = "evaluating an ONNX model needs onnxruntime: pip install 'edgeq[server]'"

# A model as a function: float32 input [N, 1, 28, 28] -> float32 logits [N, 10].
Logits = Callable[[np.ndarray], np.ndarray]


def accuracy(logits: Logits, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    """Top-1 accuracy in [0, 1] of `logits` on uint8 [N, 28, 28] images with integer labels [N]."""
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"expected labels of shape ({len(images)},), got {labels.shape}")
    x = to_input(images)
    pred = np.concatenate([np.asarray(logits(x[i:i + batch])).argmax(axis=1) for i in range(0, len(x), batch)])
    return float(np.mean(pred == labels))


def held_out_accuracies(logits: Logits, test: LabelledImages, seed: int = EVAL_SEED,
                        batch: int = 500) -> dict[str, float]:
    """{"clean": ..., NOISY_KEY: ...}: the accuracies a manifest entry reports, on the held-out split `test`."""
    return {"clean": accuracy(logits, test.images, test.labels, batch),
            NOISY_KEY: accuracy(logits, noisy_copy(test.images, seed), test.labels, batch)}


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for the model at `path` (`threads` intra-op threads; None = its default)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise EdgeqError(MISSING_ORT) from err
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_logits(path: str | Path, images: np.ndarray, batch: int = 256, threads: int | None = None) -> np.ndarray:
    """Run the ONNX model at `path` on uint8 [N, 28, 28] images; returns float32 logits [N, 10]."""
    x = to_input(images)
    sess = onnx_session(path, threads)
    name = sess.get_inputs()[0].name
    parts = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def evaluate_onnx(path: str | Path, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of the ONNX model at `path` (onnxruntime, CPU); images uint8 [N, 28, 28]."""
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"expected labels of shape ({len(images)},), got {labels.shape}")
    return float(np.mean(onnx_logits(path, images, batch).argmax(axis=1) == labels))
