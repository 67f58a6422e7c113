"""Uplink codecs: what the edge sends to the cloud per frame, and how the cloud turns it into model input.

=============  =========================================  ===========  ==========================
codec          payload per frame                          code_size    decoded model input
=============  =========================================  ===========  ==========================
``raw``        the original uint8 frame, row-major        H*W (784)    float32 [N, 1, H, W] /255
``denoised``   the denoised frame, rint(x*255) as uint8   H*W (784)    float32 [N, 1, H, W] /255
``pca-f16``    k little-endian float16 PCA coefficients   2k           float32 [N, k]
``pca-int8``   k int8 codes, coefficient = code*scale     k            float32 [N, k]
=============  =========================================  ===========  ==========================

Payloads carry no header (the wire format in `publishers.wire` frames them),
so bytes on the uplink per frame are exactly `code_size`. The int8 scales are
fixed per component (`PCAModel.code_scale`, stored in pca.npz) so edge and
cloud agree without sending them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from edge_workers.config import CODECS
from edge_workers.denoise import Denoiser
from edge_workers.reduce import PCAModel, as_pixels

logger = logging.getLogger(__name__)

FRAME_CODECS = ("raw", "denoised")
INT8_MAX = 127  # symmetric codes in [-127, 127]
F16 = np.dtype("<f2")


def calibrate_int8(coeffs: np.ndarray, percentile: float = 100.0) -> np.ndarray:
    """Per-component int8 step from training coefficients float32 [N, k] -> float32 [k].

    step = (`percentile` of |coefficient|) / 127, so the training range maps
    onto [-127, 127]; values beyond it are clipped when encoding.
    """
    coeffs = np.ascontiguousarray(coeffs, dtype=np.float32)
    if coeffs.ndim != 2 or len(coeffs) == 0:
        raise ValueError(f"expected coefficients [N, k] with N >= 1, got {list(coeffs.shape)}")
    bound = np.percentile(np.abs(coeffs), percentile, axis=0)
    return np.ascontiguousarray(np.maximum(bound, 1e-6) / INT8_MAX, dtype=np.float32)


def quantize_int8(coeffs: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 [N, k] coefficients -> int8 [N, k] codes (rounded, clipped to +-127)."""
    q = np.rint(np.ascontiguousarray(coeffs, dtype=np.float32) / scale)
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8)


def dequantize_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 [N, k] codes -> float32 [N, k] coefficients."""
    return np.ascontiguousarray(codes, dtype=np.float32) * scale


def check_codec(name: str) -> str:
    if name not in CODECS:
        raise ValueError(f"unknown uplink codec {name!r}; available: {', '.join(CODECS)}")
    return name


class UplinkCodec:
    """One codec bound to what it needs: the denoiser (encoding ``denoised``), the PCA model and k (``pca-*``).

    The cloud side only decodes, so it builds the codec without a denoiser.
    frame_shape: (H, W) of frames (taken from the PCA model when given).
    """

    def __init__(self, name: str, *, denoiser: Denoiser | None = None, pca: PCAModel | None = None,
                 k: int | None = None, frame_shape: tuple[int, int] = (28, 28)):
        self.name = check_codec(name)
        self.denoiser, self.pca = denoiser, pca
        self.frame_shape = tuple(pca.image_shape) if pca is not None else tuple(frame_shape)
        self.k = None
        if name.startswith("pca"):
            if pca is None:
                raise ValueError(f"codec {name!r} needs a fitted PCA model, got None")
            self.k = pca.check_k(k)
            if name == "pca-int8" and pca.code_scale is None:
                raise ValueError("codec 'pca-int8' needs a PCA model with code_scale (see calibrate_int8)")

    @property
    def code_size(self) -> int:
        """Exact payload bytes per frame."""
        if self.name in FRAME_CODECS:
            return int(self.frame_shape[0] * self.frame_shape[1])
        return 2 * self.k if self.name == "pca-f16" else self.k

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the decoded model input: (1, H, W) or (k,)."""
        return (1, *self.frame_shape) if self.name in FRAME_CODECS else (self.k,)

    def payload_bytes(self, n_frames: int) -> int:
        """Uplink bytes for `n_frames` frames (payloads only)."""
        return int(n_frames) * self.code_size

    # ------------------------------------------------------------ edge side

    def compute_codes(self, frames: np.ndarray, *, denoised: np.ndarray | None = None,
                      coeffs: np.ndarray | None = None) -> np.ndarray:
        """Encode a batch as uint8 [N, code_size].

        frames: uint8 [N, H, W] as received. Stages the worker already ran may
        be passed to skip recomputing them: denoised float32 [N, H, W] in
        [0, 1] (Denoiser.apply), coeffs float32 [N, >= k] (PCAModel.transform
        of the denoised frames; the first k columns are used).
        """
        frames = np.ascontiguousarray(frames)
        expected = (len(frames), *self.frame_shape)
        if frames.dtype != np.uint8 or frames.shape != expected:
            raise ValueError(f"expected uint8 frames {list(expected)}, got {frames.dtype} {list(frames.shape)}")
        n = len(frames)
        if self.name == "raw":
            return frames.reshape(n, -1)
        if self.name == "denoised" or (coeffs is None and self.denoiser is not None):
            if denoised is None:
                if self.denoiser is None:
                    raise ValueError("codec 'denoised' needs a Denoiser or the denoised frames, got neither")
                denoised = self.denoiser.apply(frames)
            denoised = np.ascontiguousarray(denoised, dtype=np.float32)
            if denoised.shape != expected:
                raise ValueError(f"expected denoised frames {list(expected)}, got {list(denoised.shape)}")
        if self.name == "denoised":
            return np.rint(np.clip(denoised, 0.0, 1.0) * 255.0).astype(np.uint8).reshape(n, -1)
        if coeffs is None:
            coeffs = self.pca.transform(frames if denoised is None else denoised, self.k)
        coeffs = np.ascontiguousarray(coeffs, dtype=np.float32)
        if coeffs.ndim != 2 or coeffs.shape[0] != n or coeffs.shape[1] < self.k:
            raise ValueError(f"expected coefficients [{n}, >= {self.k}], got {list(coeffs.shape)}")
        coeffs = coeffs[:, : self.k]
        if self.name == "pca-f16":
            return np.ascontiguousarray(coeffs.astype(F16)).view(np.uint8).reshape(n, -1)
        return quantize_int8(coeffs, self.pca.code_scale[: self.k]).view(np.uint8)

    def encode(self, frames: np.ndarray, **stages) -> list[bytes]:
        """One payload (bytes of length code_size) per frame; see compute_codes for arguments."""
        return [row.tobytes() for row in self.compute_codes(frames, **stages)]

    # ------------------------------------------------------------ cloud side

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        """uint8 [N, code_size] -> model input float32 [N, *input_shape]."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.ndim != 2 or codes.shape[1] != self.code_size:
            raise ValueError(f"expected codes [N, {self.code_size}] for {self.name!r}, got {list(codes.shape)}")
        n = len(codes)
        if self.name in FRAME_CODECS:
            return as_pixels(codes, codes.shape[1]).reshape(n, *self.input_shape)
        if self.name == "pca-f16":
            return np.ascontiguousarray(codes.view(F16), dtype=np.float32)
        return dequantize_int8(codes.view(np.int8), self.pca.code_scale[: self.k])

    def decode(self, payloads: Sequence[bytes]) -> np.ndarray:
        """Per-frame payloads -> model input float32 [N, *input_shape]; ValueError on a wrong length."""
        for i, p in enumerate(payloads):
            if len(p) != self.code_size:
                raise ValueError(f"{self.name} payload {i}: expected {self.code_size} bytes, got {len(p)}")
        buf = np.frombuffer(b"".join(payloads), dtype=np.uint8)
        return self.decode_codes(buf.reshape(len(payloads), self.code_size))


def encode(codec: str, frames: np.ndarray, *, denoiser: Denoiser | None = None, pca: PCAModel | None = None,
           k: int | None = None, **stages) -> list[bytes]:
    """Encode uint8 [N, H, W] frames with the codec named `codec`; one bytes payload per frame."""
    return UplinkCodec(codec, denoiser=denoiser, pca=pca, k=k).encode(frames, **stages)


def decode(codec: str, payloads: Sequence[bytes], *, pca: PCAModel | None = None, k: int | None = None,
           frame_shape: tuple[int, int] = (28, 28)) -> np.ndarray:
    """Decode per-frame payloads into model input: float32 [N, 1, H, W] (frame codecs) or [N, k] (pca codecs)."""
    return UplinkCodec(codec, pca=pca, k=k, frame_shape=frame_shape).decode(payloads)

