"""Sensor noise models applied by simulated devices (and by training augmentation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NOISE_KINDS = ("none", "gaussian", "salt-and-pepper")


@dataclass(frozen=True)
class NoiseConfig:
    """Which sensor noise a simulated device adds.

    kind: one of NOISE_KINDS.
    level: for `gaussian`, the standard deviation as a fraction of full scale
        (0.2 -> sigma = 51 grey levels on uint8); for `salt-and-pepper`, the
        fraction of pixels forced to 0 or 255. Must be in [0, 1].
    """

    kind: str = "none"
    level: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {self.kind!r}")
        if not 0.0 <= float(self.level) <= 1.0:
            raise ValueError(f"noise level must be in [0, 1], got {self.level!r}")

    @property
    def enabled(self) -> bool:
        return self.kind != "none" and self.level > 0


def add_noise(images: np.ndarray, cfg: NoiseConfig, rng: np.random.Generator) -> np.ndarray:
    """Return a noisy copy of `images`.

    images: uint8 [..., H, W] (any leading batch dims). Returns uint8, same shape.
    """
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"add_noise expects uint8 images, got {images.dtype}")
    if not cfg.enabled:
        return images.copy()
    if cfg.kind == "gaussian":
        sigma = float(cfg.level) * 255.0
        noisy = images.astype(np.float32) + rng.normal(0.0, sigma, size=images.shape).astype(np.float32)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    # salt-and-pepper
    out = images.copy()
    hit = rng.random(images.shape) < float(cfg.level)
    salt = rng.random(images.shape) < 0.5
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out
