"""The reference models' interface: tensor names, input scaling, and the noisy copy of the held-out split."""

from __future__ import annotations

import numpy as np

from publishers.noise import NoiseConfig, add_noise

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_SCALE = "uint8/255"
EVAL_NOISE = NoiseConfig("gaussian", 0.2)  # noisy accuracy is reported, never used to select
NOISY_KEY = f"{EVAL_NOISE.kind}_{EVAL_NOISE.level:g}"  # "gaussian_0.2" in the manifest
EVAL_SEED = 1234  # RNG seed of the noisy held-out copy (the training seed: figures stay comparable)
# How a manifest entry describes the input and output of every reference model.
INPUT_SPEC = {"name": INPUT_NAME, "shape": ["batch", 1, 28, 28], "dtype": "float32", "scale": INPUT_SCALE}
OUTPUT_SPEC = {"name": OUTPUT_NAME, "shape": ["batch", 10], "dtype": "float32"}


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] pixels -> float32 [N, 1, 28, 28] model input (pixels / 255)."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 [N, 28, 28] images, got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images[:, None, :, :], dtype=np.float32) / np.float32(255.0)


def noisy_copy(images: np.ndarray, seed: int = EVAL_SEED) -> np.ndarray:
    """uint8 [N, 28, 28] images with EVAL_NOISE added (seeded): the noisy accuracy the manifest reports."""
    return add_noise(images, EVAL_NOISE, np.random.default_rng(seed))
