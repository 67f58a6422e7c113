"""PCA dimensionality reduction of frames: fit with scikit-learn, stored as `pca.npz`, applied with numpy.

The edge reduces each (denoised) frame to its first `k` principal-component
coefficients before sending it to the cloud (Huang et al., ICNP 2017). Fitting
needs scikit-learn (imported lazily by :func:`fit_pca`); loading and applying a
fitted model needs numpy only, so edge workers do not pay for sklearn.

Units: pixel vectors are float32 [N, D] with values pixels / 255 in [0, 1]
(D = 784 for 28x28 frames); coefficients are in the same units, projected.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PCA_FILE = "pca.npz"
PCA_FORMAT = 1


def as_pixels(x: np.ndarray, dim: int) -> np.ndarray:
    """Coerce frames to float32 [N, dim] pixel vectors in [0, 1].

    x: uint8 [N, H, W] or [N, dim] (divided by 255), or float32 [N, H, W] /
    [N, dim] already in [0, 1] (left as is). Raises ValueError naming the
    expected and actual shape.
    """
    x = np.asarray(x)
    if x.ndim == 3:
        x = x.reshape(x.shape[0], -1)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected frames [N, {dim}] or [N, H, W] with H*W = {dim}, got {list(x.shape)}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class PCAModel:
    """A fitted PCA basis (numpy only).

    mean: float32 [D]; components: float32 [k_max, D], orthonormal rows, by
    decreasing variance; explained_variance: float32 [k_max] (pixel/255
    units squared); code_scale: float32 [k_max] or None, the fixed int8
    quantisation step per component (coefficient = int8 code * code_scale),
    set by `edge_workers.codecs.calibrate_int8`; image_shape: (H, W) with
    H * W = D; meta: JSON-serialisable fit metadata.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    image_shape: tuple[int, int] = (28, 28)
    code_scale: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mean = np.ascontiguousarray(self.mean, dtype=np.float32)
        comps = np.ascontiguousarray(self.components, dtype=np.float32)
        var = np.ascontiguousarray(self.explained_variance, dtype=np.float32)
        shape = tuple(int(s) for s in self.image_shape)
        if mean.ndim != 1 or comps.ndim != 2 or comps.shape[1] != mean.shape[0]:
            raise ValueError(f"expected mean [D] and components [k_max, D], "
                             f"got {list(mean.shape)} and {list(comps.shape)}")
        if var.shape != (comps.shape[0],):
            raise ValueError(f"expected explained_variance [{comps.shape[0]}], got {list(var.shape)}")
        if len(shape) != 2 or shape[0] * shape[1] != mean.shape[0]:
            raise ValueError(f"image_shape {shape} does not hold D = {mean.shape[0]} pixels")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "components", comps)
        object.__setattr__(self, "explained_variance", var)
        object.__setattr__(self, "image_shape", shape)
        if self.code_scale is not None:
            scale = np.ascontiguousarray(self.code_scale, dtype=np.float32)
            if scale.shape != var.shape or not np.all(scale > 0):
                raise ValueError(f"expected positive code_scale [{var.shape[0]}], got {list(scale.shape)}")
            object.__setattr__(self, "code_scale", scale)

    @property
    def k_max(self) -> int:
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    def check_k(self, k: int | None) -> int:
        """Return `k` (default k_max) after checking 1 <= k <= k_max; ValueError otherwise."""
        k = self.k_max if k is None else int(k)
        if not 1 <= k <= self.k_max:
            raise ValueError(f"k must be in [1, k_max={self.k_max}] for this PCA model, got {k}")
        return k

    def transform(self, x: np.ndarray, k: int | None = None) -> np.ndarray:
        """Project frames onto the first `k` components.

        x: float32 [N, D] (or [N, H, W]) pixels / 255, or uint8 frames.
        Returns float32 [N, k] coefficients.
        """
        k = self.check_k(k)
        x = as_pixels(x, self.dim)
        return np.ascontiguousarray((x - self.mean) @ self.components[:k].T, dtype=np.float32)

    def inverse_transform(self, coeffs: np.ndarray) -> np.ndarray:
        """Reconstruct pixels from coefficients: float32 [N, k] -> float32 [N, D] (not clipped)."""
        coeffs = np.ascontiguousarray(coeffs, dtype=np.float32)
        if coeffs.ndim != 2:
            raise ValueError(f"expected coefficients [N, k], got {list(coeffs.shape)}")
        k = self.check_k(coeffs.shape[1])
        return np.ascontiguousarray(coeffs @ self.components[:k] + self.mean, dtype=np.float32)

    def explained_variance_ratio(self, k: int | None = None) -> float:
        """Fraction of the training pixel variance kept by the first `k` components."""
        total = float(self.meta.get("total_variance", 0.0))
        if total <= 0:
            raise RuntimeError("this PCA model does not record total_variance in its metadata")
        return float(self.explained_variance[: self.check_k(k)].sum()) / total

    def with_code_scale(self, code_scale: np.ndarray) -> PCAModel:
        """A copy with the int8 quantisation step float32 [k_max] set."""
        return replace(self, code_scale=code_scale)

    # ------------------------------------------------------------ storage

    def save(self, path: str | Path) -> Path:
        """Write the model as an uncompressed .npz (no pickles); returns the path."""
        path = Path(path)
        arrays = {
            "mean": self.mean,
            "components": self.components,
            "explained_variance": self.explained_variance,
            "image_shape": np.asarray(self.image_shape, dtype=np.int64),
            "meta": np.asarray(json.dumps({"format": PCA_FORMAT, **self.meta}, sort_keys=True)),
        }
        if self.code_scale is not None:
            arrays["code_scale"] = self.code_scale
        with open(path, "wb") as fh:  # a file handle keeps numpy from appending ".npz"
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PCAModel:
        """Read a model written by :meth:`save` (numpy only, allow_pickle=False)."""
        try:
            with np.load(str(path), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.pop("format", None) != PCA_FORMAT:
                    raise ValueError(f"{path}: unsupported PCA file format, expected {PCA_FORMAT}")
                return cls(
                    mean=z["mean"], components=z["components"], explained_variance=z["explained_variance"],
                    image_shape=tuple(int(s) for s in z["image_shape"]),
                    code_scale=z["code_scale"] if "code_scale" in z.files else None, meta=meta,
                )
        except KeyError as err:
            raise ValueError(f"{path}: not a PCA model file: missing array {err}") from err


def fit_pca(x: np.ndarray, k_max: int, seed: int = 0, image_shape: tuple[int, int] = (28, 28)) -> PCAModel:
    """Fit a PCA basis with scikit-learn (full SVD, deterministic).

    x: training frames, uint8 [N, H, W] or float32 [N, D] pixels / 255.
    k_max: number of components to keep; ValueError when k_max < 1, k_max > D
    or k_max > N (a PCA cannot have more components than samples).
    """
    dim = int(image_shape[0] * image_shape[1])
    x = as_pixels(x, dim)
    n = x.shape[0]
    if not 1 <= int(k_max) <= min(n, dim):
        raise ValueError(f"k_max must be in [1, min(samples={n}, dim={dim})], got {k_max}")
    from sklearn.decomposition import PCA  # fit time only

    sk = PCA(n_components=int(k_max), svd_solver="full", random_state=seed).fit(x)
    meta = {
        "fit_samples": int(n),
        "total_variance": float(x.var(axis=0, ddof=1).sum()),
        "explained_variance_ratio": float(sk.explained_variance_ratio_.sum()),
        "seed": int(seed),
        "input_scale": "uint8/255",
    }
    logger.debug("fitted PCA k_max=%d on %d samples, %.4f variance kept", k_max, n, meta["explained_variance_ratio"])
    return PCAModel(sk.mean_, sk.components_, sk.explained_variance_, image_shape=tuple(image_shape), meta=meta)
