"""Calibration data, held-out accuracy and the models/manifest.json entry of a Q-CNN model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modelstore import evaluate
from modelstore.files import sha256_file
from modelstore.interface import INPUT_SPEC, OUTPUT_SPEC, to_input
from publishers.datasets import load_mnist


def calibration_images(data_dir, n: int, seed: int = 0) -> np.ndarray:
    """n unlabelled TRAIN-split images (seeded choice) as model input float32 [n, 1, 28, 28]."""
    train = load_mnist(data_dir, "train")
    if n > len(train.images):
        raise ValueError(f"asked for {n} calibration images, the train split has {len(train.images)}")
    idx = np.sort(np.random.default_rng(seed).choice(len(train.images), size=n, replace=False))
    return to_input(train.images[idx])


def load_calibration(source, n: int, seed: int = 0) -> np.ndarray:
    """Calibration inputs from an MNIST directory (train split) or a .npy file.

    A .npy may hold uint8 [N, 28, 28] images or float32 model inputs [N, ...]; the first n are used.
    """
    path = Path(source)
    if path.is_dir():
        return calibration_images(path, n, seed)
    arr = np.load(path)
    if arr.dtype == np.uint8 and arr.ndim == 3:
        arr = to_input(arr)
    return np.ascontiguousarray(arr[:n], dtype=np.float32)


def accuracy(key: str, path, images: np.ndarray, labels: np.ndarray, batch: int = 500, threads: int = 1) -> float:
    """Top-1 accuracy in [0, 1] of the model at `path` under runtime `key`; images uint8 [N, 28, 28]."""
    from edge_workers.runtime import load_runtime

    return evaluate.accuracy(load_runtime(key, path, threads=threads).predict, images, labels, batch)


def test_accuracies(key: str, path, data_dir, threads: int = 1) -> dict[str, float]:
    """Held-out test accuracy, clean and with the manifest's gaussian noise (same RNG seed as training)."""
    from edge_workers.runtime import load_runtime

    return evaluate.held_out_accuracies(load_runtime(key, path, threads=threads).predict, load_mnist(data_dir, "test"))


def manifest_entry(report, data_dir, standard_path=None, threads: int = 1) -> dict:
    """Manifest entry for the Q-CNN file of a CompressReport (accuracy measured on the test split)."""
    import onnx

    from edge_workers.qcnn.export import DOMAIN, FORMAT_VERSION

    path, float_path = Path(report.out_path), Path(report.in_path)
    model = onnx.load(str(path))
    entry = {
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "format": f"qcnn/{FORMAT_VERSION}",
        "runtime": "qcnn",
        "domain": DOMAIN,
        "op_types": sorted({(f"{n.domain}:" if n.domain else "") + n.op_type for n in model.graph.node}),
        "float_model": {"file": float_path.name, "bytes": report.in_bytes,
                        "test_accuracy": test_accuracies("onnx", float_path, data_dir, threads)},
        "compression_vs_float": round(report.ratio, 3),
        "input": INPUT_SPEC,
        "output": OUTPUT_SPEC,
        "test_accuracy": test_accuracies("qcnn", path, data_dir, threads),
        "test_images": len(load_mnist(data_dir, "test")),
        "calib_images": report.calib_images,
        "calib_split": "train",
        "settings": report.config,
        "layers": [{k: v for k, v in ly.items() if k != "seconds"} for ly in report.layers],
    }
    if standard_path is not None:
        std = Path(standard_path)
        entry["standard_export"] = {"file": std.name, "sha256": sha256_file(std), "bytes": std.stat().st_size,
                                    "test_accuracy": test_accuracies("onnx", std, data_dir, threads)}
    return entry
