"""Uplink codecs for the tensor at a split point: float32, float16, int8 (per-tensor or per-channel scale), PQ codes.

A cut's tensor crosses the hop as one wire frame per sample (`publishers.wire`, tensor frame,
version 2); this module turns float32 activations into the frame's codes and scales and back,
with numpy only (a device runs it next to its head model).

==============  ========  ==================  ==========================================================
codec           element   scales per frame    decoded value
==============  ========  ==================  ==========================================================
``float32``     float32   0                   the value, bit for bit
``float16``     float16   0                   IEEE half rounding of the value (round to nearest even)
``int8``        int8      1                   code * scale; scale = max|x| / 127 over the sample
``int8-channel`` int8     shape[0]            code * scale[c]; scale[c] = max|x[c]| / 127 per channel c
``pq8``         uint8     0 (codebook shared) codebook[m, code] for each sub-vector (``PQCodebook``)
==============  ========  ==================  ==========================================================

int8 scales are dynamic: computed from each sample's own tensor when it is encoded, so no
calibration data is involved and the scales travel in the frame (float32, 4 bytes each). An
all-zero sample (or channel) gets scale 1.0, so a scale is always finite and > 0. Codes are
symmetric, rint(x / scale) clipped to [-127, 127], so the error of a value is at most scale / 2.

``pq8`` splits the channel axis (axis 0 of the per-sample shape) into M = C / dsub sub-vectors at
every position and sends, per sub-vector, the index of its nearest codeword (K <= 256): codes
uint8 [M, *shape[1:]]. The codebook float32 [M, K, dsub] is trained on the train split
(``modelstore.partition_pq``) and shipped with the head and the tail, never per frame.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# Codec name -> wire code (byte 11 of a tensor frame). Codes are never reused.
CODEC_CODES = {"float32": 1, "float16": 2, "int8": 3, "int8-channel": 4, "pq8": 5}
CODEC_NAMES = {code: name for name, code in CODEC_CODES.items()}
CODECS = tuple(CODEC_CODES)
# The element dtype of each codec's payload.
CODEC_DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "int8-channel": np.dtype("i1"),
    "pq8": np.dtype("u1"),
}
LOSSLESS = ("float32",)
INT8_MAX = 127
SCALE_BYTES = 4  # one float32 per scale


def check_codec(name: str) -> str:
    """`name` if it is a tensor codec, else ValueError naming the known ones."""
    if name not in CODEC_CODES:
        raise ValueError(f"unknown tensor codec {name!r}; known: {', '.join(CODECS)}")
    return name


def applicable(codec: str, shape: tuple[int, ...], pq_dsub: int | None = None) -> bool:
    """Whether `codec` can carry a per-sample tensor of `shape` (pq8 also needs the cut's codebook dsub).

    int8-channel needs a channel axis (ndim >= 2: one scale per sample element would cost more than float32).
    """
    check_codec(codec)
    if codec == "int8-channel":
        return len(shape) >= 2
    if codec == "pq8":
        return pq_dsub is not None and pq_dsub >= 1 and shape[0] % pq_dsub == 0
    return True


def scale_count(codec: str, shape: tuple[int, ...]) -> int:
    """Number of float32 scales a frame of `codec` carries for a per-sample tensor of `shape`."""
    check_codec(codec)
    if codec == "int8":
        return 1
    if codec == "int8-channel":
        return int(shape[0])
    return 0


def code_shape(codec: str, shape: tuple[int, ...], pq_dsub: int = 0) -> tuple[int, ...]:
    """Per-sample shape of the codes: `shape`, except pq8: (shape[0] // dsub, *shape[1:])."""
    if codec == "pq8":
        if not pq_dsub or shape[0] % pq_dsub:
            raise ValueError(f"pq8 dsub {pq_dsub} must divide the channel count {shape[0]} of shape {shape}")
        return (shape[0] // pq_dsub, *shape[1:])
    check_codec(codec)
    return tuple(shape)


def payload_bytes(codec: str, shape: tuple[int, ...], pq_dsub: int = 0) -> int:
    """Exact bytes of one frame's codes plus its scales (the per-sample data, without the frame header)."""
    codes = math.prod(code_shape(codec, shape, pq_dsub)) * CODEC_DTYPES[codec].itemsize
    return codes + SCALE_BYTES * scale_count(codec, shape)


@dataclass(frozen=True)
class PQCodebook:
    """Product-quantization codebook of one cut: float32 [M, K, dsub] over the channel axis (K <= 256)."""

    centroids: np.ndarray

    def __post_init__(self):
        c = np.ascontiguousarray(self.centroids, dtype=np.float32)
        if c.ndim != 3 or not 1 <= c.shape[1] <= 256 or not np.all(np.isfinite(c)):
            raise ValueError(f"expected finite centroids [M, K <= 256, dsub], got {list(c.shape)}")
        object.__setattr__(self, "centroids", c)

    @property
    def M(self) -> int:
        return self.centroids.shape[0]

    @property
    def ksub(self) -> int:
        return self.centroids.shape[1]

    @property
    def dsub(self) -> int:
        return self.centroids.shape[2]

    def compute_codes(self, x: np.ndarray) -> np.ndarray:
        """float32 [N, M*dsub, *rest] -> uint8 [N, M, *rest]: nearest codeword (squared L2) per sub-vector."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n, c = x.shape[0], x.shape[1]
        if c != self.M * self.dsub:
            raise ValueError(f"pq8 codebook covers {self.M * self.dsub} channels, got tensor {list(x.shape)}")
        rest = x.shape[2:]
        sub = x.reshape(n, self.M, self.dsub, -1).transpose(1, 0, 3, 2).reshape(self.M, -1, self.dsub)
        codes = np.empty(sub.shape[:2], dtype=np.uint8)
        norms = np.einsum("mkd,mkd->mk", self.centroids, self.centroids)
        for m in range(self.M):
            d = norms[m][None, :] - 2.0 * (sub[m] @ self.centroids[m].T)
            codes[m] = np.argmin(d, axis=1)
        return np.ascontiguousarray(codes.reshape(self.M, n, -1).transpose(1, 0, 2).reshape(n, self.M, *rest))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """uint8 [N, M, *rest] -> float32 [N, M*dsub, *rest] (each sub-vector replaced by its codeword)."""
        codes = np.asarray(codes)
        if codes.ndim < 2 or codes.shape[1] != self.M:
            raise ValueError(f"expected pq8 codes [N, {self.M}, ...], got {list(codes.shape)}")
        if codes.size and int(codes.max()) >= self.ksub:
            raise ValueError(f"pq8 code {int(codes.max())} out of range for K={self.ksub}")
        n, rest = codes.shape[0], codes.shape[2:]
        flat = codes.reshape(n, self.M, -1)
        out = self.centroids[np.arange(self.M)[None, :, None], flat]  # [N, M, P, dsub]
        return np.ascontiguousarray(out.transpose(0, 1, 3, 2).reshape(n, self.M * self.dsub, *rest))


def compute_codes(x: np.ndarray, codec: str, pq: PQCodebook | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch: x float32 [N, *shape] -> (codes [N, *code_shape] of CODEC_DTYPES[codec], scales float32 [N, s]).

    s = scale_count(codec, shape). pq8 needs the cut's codebook `pq`.
    """
    check_codec(codec)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"expected a batch [N, *shape], got shape {list(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise ValueError("tensor has non-finite values; a codec carries finite activations only")
    n, shape = x.shape[0], x.shape[1:]
    none = np.zeros((n, 0), dtype=np.float32)
    if codec == "float32":
        return x, none
    if codec == "float16":
        return x.astype(np.float16), none
    if codec == "pq8":
        if pq is None:
            raise ValueError("codec 'pq8' needs the cut's PQ codebook, got None")
        return pq.compute_codes(x), none
    if codec == "int8-channel" and len(shape) < 2:
        raise ValueError(f"int8-channel needs a channel axis (ndim >= 2), got per-sample shape {list(shape)}")
    axes = tuple(range(1, x.ndim)) if codec == "int8" else tuple(range(2, x.ndim))
    amax = np.abs(x).max(axis=axes).reshape(n, -1)  # [N, 1] or [N, C]
    scales = np.where(amax > 0, amax / np.float32(INT8_MAX), np.float32(1.0)).astype(np.float32)
    bshape = (n, -1) + (1,) * (x.ndim - 2) if codec == "int8-channel" else (n,) + (1,) * (x.ndim - 1)
    q = np.rint(x / scales.reshape(bshape))
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8), scales


def decode_codes(codes: np.ndarray, scales: np.ndarray, codec: str, pq: PQCodebook | None = None) -> np.ndarray:
    """Decode a batch: codes [N, *code_shape], scales float32 [N, s] -> float32 [N, *shape]."""
    check_codec(codec)
    codes = np.asarray(codes)
    if codes.dtype != CODEC_DTYPES[codec]:
        raise ValueError(f"codec {codec!r} codes are {CODEC_DTYPES[codec]}, got {codes.dtype}")
    if codec in ("float32", "float16"):
        return np.ascontiguousarray(codes, dtype=np.float32)
    if codec == "pq8":
        if pq is None:
            raise ValueError("codec 'pq8' needs the cut's PQ codebook, got None")
        return pq.decode(codes)
    n = codes.shape[0]
    scales = np.asarray(scales, dtype=np.float32)
    want = (n, scale_count(codec, codes.shape[1:]))
    if scales.shape != want:
        raise ValueError(f"codec {codec!r} of codes {list(codes.shape)} needs scales {list(want)}, "
                         f"got {list(scales.shape)}")
    bshape = (n, -1) + (1,) * (codes.ndim - 2) if codec == "int8-channel" else (n,) + (1,) * (codes.ndim - 1)
    return codes.astype(np.float32) * scales.reshape(bshape)


@dataclass(frozen=True)
class CutSpec:
    """What a receiver knows about one cut: the frames it accepts (`publishers.wire.check_cut`).

    cut_id: e.g. "edge_cnn@pool1"; model_hash: first 8 bytes of the source model file's sha256;
    shape: per-sample tensor shape at the cut; codecs: the codecs offered there; pq_dsub: the
    dsub of the cut's pq8 codebook (0 when it has none).
    """

    cut_id: str
    model_hash: bytes
    shape: tuple[int, ...]
    codecs: tuple[str, ...] = ("float32", "float16", "int8")
    pq_dsub: int = 0

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "codecs", tuple(check_codec(c) for c in self.codecs))
