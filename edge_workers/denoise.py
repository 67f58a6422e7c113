"""Noise reduction of frame batches at the edge, for the publishers' noise models.

Methods (`DenoiseConfig.method`):

- ``none``: only rescale to [0, 1].
- ``median``: 3x3 median filter (edge-replicated border), vectorised as a
  min/max exchange network; removes salt-and-pepper, blurs thin strokes a little.
- ``impulse``: switching median: replace only pixels at 0 or 255 that differ
  from their 3x3 median by more than `impulse_threshold`; removes
  salt-and-pepper and leaves clean frames almost untouched.
- ``pca``: project onto the first `components` principal components fitted on
  clean training frames and reconstruct (clip to [0, 1]); suppresses gaussian
  noise, which spreads evenly over all 784 directions.
- ``median+pca`` / ``impulse+pca``: the filter, then the projection.
- ``auto``: ``impulse``, then the projection only for frames whose PCA
  residual (mean squared pixel difference to their own reconstruction)
  exceeds `gate_mse`: clean digits lie close to the PCA subspace (residual
  <= 0.0080 for 99.5 % of the train split's validation frames at 144
  components), gaussian-noisy ones do not (>= 0.0144 for 95 % at sigma
  0.2), so clean and salt-and-pepper frames are not blurred by the
  projection.

Every method takes uint8 [N, H, W] frames (or float32 in [0, 1]) and returns
float32 [N, H, W] in [0, 1], i.e. pixels / 255 -- the edge CNN's input scale
(add the channel axis: ``out[:, None]``).

The median and switching-median filters of uint8 frames run as one numba
kernel when numba is installed (`edge_workers.denoise_kernels`: same bits,
far less fixed cost per batch), else as numpy calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edge_workers.reduce import PCAModel

logger = logging.getLogger(__name__)


def _load_kernel():  # -> edge_workers.denoise_kernels.median_filter_u8 or None
    try:
        from edge_workers.denoise_kernels import median_filter_u8
    except ImportError as err:  # a device install without numba: the numpy path
        logger.debug("denoise: numba kernel unavailable (%s), numpy path", err)
        return None
    return median_filter_u8

METHODS = ("none", "median", "impulse", "pca", "median+pca", "impulse+pca", "auto")
# Defaults chosen on the validation slice of the TRAIN split (split_train seed 1234: the 1,000 images the
# CNNs did not train on) by scripts/select_preprocessing.py, tables in docs/results/preprocessing.md; the
# earlier test-split tuning landed on the same values, kept. Rule: highest edge CNN accuracy on the denoised
# frames (mean over clean / gaussian 0.2 / s&p 0.05+0.1), ties within 0.1 point broken by lowest MSE.
# Validation, none -> auto: accuracy clean 99.30 -> 99.20 %, gaussian 0.2 98.50 -> 98.33 %, s&p 0.1
# 97.67 -> 98.50 % (mean 98.64 -> 98.76 %); MSE gaussian 0.0212 -> 0.0097, s&p 0.1 0.0483 -> 0.0042.
# ``impulse`` costs the same 0.2 point on gaussian (98.30 %) at no MSE gain there.
DEFAULT_METHOD = "auto"
DEFAULT_COMPONENTS = 144


@dataclass(frozen=True)
class DenoiseConfig:
    """Which noise reduction the edge applies.

    method: one of METHODS.
    components: PCA components kept by the ``pca`` step (<= the PCA file's k_max).
    impulse_threshold: for ``impulse``, the minimum |pixel - 3x3 median| in
        grey levels (0..255) for a 0/255 pixel to count as an impulse.
    gate_mse: for ``auto``, the per-frame PCA residual (mean squared
        difference, pixels / 255 units) above which a frame is projected.
    """

    method: str = DEFAULT_METHOD
    components: int = DEFAULT_COMPONENTS
    impulse_threshold: int = 160  # validation grid 96 / 160 / 224 (scripts/select_preprocessing.py)
    gate_mse: float = 0.012  # validation grid 0.008 / 0.012 / 0.016

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"denoise method must be one of {METHODS}, got {self.method!r}")
        if int(self.components) < 1:
            raise ValueError(f"denoise components must be >= 1, got {self.components!r}")
        if not 0 <= int(self.impulse_threshold) <= 255:
            raise ValueError(f"impulse_threshold must be in [0, 255], got {self.impulse_threshold!r}")
        if not float(self.gate_mse) >= 0:
            raise ValueError(f"gate_mse must be >= 0, got {self.gate_mse!r}")

    @property
    def needs_pca(self) -> bool:
        return self.method.endswith("pca") or self.method == "auto"


def as_unit_frames(frames: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] (scaled by 1/255) or float [N, H, W] in [0, 1] -> float32 [N, H, W] in [0, 1]."""
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"expected frames [N, H, W], got {list(frames.shape)}")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(frames, dtype=np.float32)


# Devillard's 19-exchange network (after Paeth, Graphics Gems): p[4] ends up the median of p[0..8].
_MEDIAN9_NETWORK = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
                    (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def median3x3(x: np.ndarray) -> np.ndarray:
    """3x3 median of each frame, border replicated. x: [N, H, W] any dtype -> same dtype and shape.

    Elementwise min/max over the nine shifted frames (an exchange network), not
    a sort of each window: measured 9.0 -> 0.9 ms for 64 float32 28x28 frames
    (np.partition of the [N, H, W, 9] windows before). Exact: the median is one
    of the nine values either way. NaN propagates through min/max (frames reach
    the denoiser finite: `frame_pixels` rejects NaN).
    """
    x = np.ascontiguousarray(x)
    if x.ndim != 3:
        raise ValueError(f"expected frames [N, H, W], got {list(x.shape)}")
    n, h, w = x.shape
    # Border replicated by hand: np.pad(mode="edge") cost more than the rest for a small batch (issue 7).
    padded = np.empty((n, h + 2, w + 2), dtype=x.dtype)
    padded[:, 1:-1, 1:-1] = x
    padded[:, 0, 1:-1], padded[:, -1, 1:-1] = x[:, 0], x[:, -1]
    padded[:, :, 0], padded[:, :, -1] = padded[:, :, 1], padded[:, :, -2]
    p = [padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)]
    for a, b in _MEDIAN9_NETWORK:
        p[a], p[b] = np.minimum(p[a], p[b]), np.maximum(p[a], p[b])
    return np.ascontiguousarray(p[4])


def impulse_filter(x: np.ndarray, threshold: float, med: np.ndarray | None = None) -> np.ndarray:
    """Switching median: float32 [N, H, W] in [0, 1] -> same, impulses replaced by their 3x3 median.

    A pixel is an impulse when it is at 0 or 1 (full scale) and differs from
    its 3x3 median by more than `threshold` (same [0, 1] units). med: the 3x3
    median of x if already computed (e.g. on the uint8 frames, then scaled).
    """
    med = median3x3(x) if med is None else med
    extreme = (x <= 0.0) | (x >= 1.0)
    return np.where(extreme & (np.abs(x - med) > threshold), med, x)


class Denoiser:
    """Applies one DenoiseConfig to frame batches.

    pca: the fitted PCAModel (required for the ``*pca`` methods, whose
    `components` must not exceed its k_max).
    """

    def __init__(self, cfg: DenoiseConfig | None = None, pca: PCAModel | None = None):
        self.cfg = cfg or DenoiseConfig()
        if self.cfg.needs_pca:
            if pca is None:
                raise ValueError(f"denoise method {self.cfg.method!r} needs a fitted PCA model, got None")
            pca.check_k(self.cfg.components)
        self.pca = pca
        self._kernel = _load_kernel() if self.cfg.method.startswith(("median", "impulse", "auto")) else None
        self._threshold = np.float32(self.cfg.impulse_threshold / 255.0)
        if self._kernel is not None:  # compile (or load from numba's cache) now, not on the first batch
            self._filter_u8(np.zeros((1, 2, 2), dtype=np.uint8))

    def _filter_u8(self, frames: np.ndarray) -> np.ndarray:
        """The median or switching-median filter of uint8 frames with the numba kernel -> float32 in [0, 1]."""
        out = np.empty(frames.shape, dtype=np.float32)
        self._kernel(np.ascontiguousarray(frames), self._threshold, not self.cfg.method.startswith("median"), out)
        return out

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """Denoise a batch. frames: uint8 [N, H, W] or float32 [N, H, W] in [0, 1].

        Returns float32 [N, H, W] in [0, 1] (pixels / 255).
        """
        frames = np.asarray(frames)
        if frames.ndim != 3:
            raise ValueError(f"expected frames [N, H, W], got {list(frames.shape)}")
        if self.pca is not None and frames.shape[1:] != self.pca.image_shape:
            raise ValueError(f"expected frames [N, {self.pca.image_shape[0]}, {self.pca.image_shape[1]}], "
                             f"got {list(frames.shape)}")
        method = self.cfg.method
        if self._kernel is not None and frames.dtype == np.uint8:
            x = self._filter_u8(frames)  # the median or switching median, scaled, in one call
        else:
            x = as_unit_frames(frames)
            med = None
            if method != "none" and not method.startswith("pca") and frames.dtype == np.uint8:
                # The median of uint8 frames, then scaled, is bit-identical to the median of the scaled frames
                # (scaling is monotonic) and takes half the time (0.75 vs 1.4 ms for 64 frames).
                med = as_unit_frames(median3x3(frames))
            if method.startswith("median"):
                x = median3x3(x) if med is None else med
            elif method.startswith("impulse") or method == "auto":
                x = impulse_filter(x, self.cfg.impulse_threshold / 255.0, med)
        if self.cfg.needs_pca and len(x):
            flat = x.reshape(len(x), -1)
            recon = self.pca.inverse_transform(self.pca.transform(flat, self.cfg.components))
            np.clip(recon, 0.0, 1.0, out=recon)
            if method == "auto":
                noisy = np.mean((flat - recon) ** 2, axis=1) > self.cfg.gate_mse
                recon = np.where(noisy[:, None], recon, flat)
            x = recon.reshape(x.shape)
        return np.ascontiguousarray(x, dtype=np.float32)
