"""The frame wire format: a versioned 32-byte binary header, shape, device id, then raw pixels or a cut's tensor.

The layout is specified in docs/wire-format.md; this module is the only
Python implementation. All integers are little-endian. Version 1 is the pixel
frame (`encode`/`decode`, layout below); version 2 is the tensor frame, the
activation at a split point of a partitioned model (`encode_tensor`/`decode_tensor`,
layout in docs/wire-format.md and at TENSOR_EXT); `decode_any` reads both.

    offset size field
    0      4    magic b"EQFR"
    4      1    version (1)
    5      1    dtype code (DTYPE_CODES)
    6      1    ndim, 1..4
    7      1    flags (FLAG_*)
    8      2    label, uint16 (meaningful only with FLAG_HAS_LABEL)
    10     1    device id length in bytes, 1..64
    11     1    reserved, 0
    12     4    payload length in bytes, uint32
    16     8    sequence number, uint64, per device
    24     8    capture time, int64 nanoseconds since the Unix epoch (UTC)
    32     4*ndim  shape, uint32 each, C order
    ..     n    device id, ASCII [A-Za-z0-9_.-]
    ..     payload_len  pixels, C order, little-endian
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from publishers import tensor_codec as tc
from publishers.errors import FrameDecodeError, FrameEncodeError

MAGIC = b"EQFR"
VERSION = 1  # the pixel frame
TENSOR_VERSION = 2  # the tensor frame
HEADER = struct.Struct("<4sBBBBHBBIQq")
HEADER_SIZE = HEADER.size  # 32
MAX_NDIM = 4
MAX_DEVICE_ID_LEN = 64

FLAG_HAS_LABEL = 0x01
FLAG_NOISY = 0x02  # the device added simulated sensor noise
KNOWN_FLAGS = FLAG_HAS_LABEL | FLAG_NOISY

DTYPE_CODES = {
    1: np.dtype("u1"),
    2: np.dtype("<u2"),
    3: np.dtype("<f4"),
    4: np.dtype("<f2"),
    5: np.dtype("i1"),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# Every FrameDecodeError.reason, for metrics (a bounded label set).
DECODE_REASONS = (
    "short_header",
    "bad_magic",
    "unknown_version",
    "unknown_dtype",
    "bad_ndim",
    "unknown_flags",
    "bad_device_id",
    "shape_limit",
    "payload_size",
    # tensor frames (version 2)
    "bad_cut_id",
    "unknown_codec",
    "bad_scale",
    # tensor frames checked against the known cuts (check_cut)
    "unknown_cut",
    "cut_shape",
    "cut_codec",
)


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds a decoder enforces before allocating anything.

    max_elements: largest number of array elements a frame may declare.
    max_dim: largest size of any one dimension.
    """

    max_elements: int = 1 << 22  # 4 Mi elements: a 2048x2048 frame
    max_dim: int = 1 << 14


@dataclass(frozen=True)
class Frame:
    """One sensor frame.

    pixels: array [*shape] of a DTYPE_CODES dtype, C order (uint8 [28, 28] for MNIST).
    capture_ns: capture time, integer nanoseconds since the Unix epoch, UTC.
    label: ground-truth class when known, else None.
    """

    device_id: str
    seq: int
    capture_ns: int
    pixels: np.ndarray
    label: int | None = None
    flags: int = 0

    @property
    def noisy(self) -> bool:
        return bool(self.flags & FLAG_NOISY)


def encode(frame: Frame) -> bytes:
    """Serialize a frame. Raises FrameEncodeError for values the format cannot carry."""
    pixels = frame.pixels
    dtype = np.dtype(pixels.dtype).newbyteorder("<") if pixels.dtype.itemsize > 1 else pixels.dtype
    code = _CODE_OF.get(dtype)
    if code is None:
        supported = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise FrameEncodeError(f"dtype {pixels.dtype} is not supported; use one of {supported}")
    flags, label = _check_fields(frame.device_id, frame.seq, frame.capture_ns, frame.label, frame.flags, pixels.shape)
    payload = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    device = frame.device_id.encode("ascii")
    header = HEADER.pack(
        MAGIC, VERSION, code, pixels.ndim, flags, label, len(device), 0,
        len(payload), frame.seq, frame.capture_ns,
    )
    shape = struct.pack(f"<{pixels.ndim}I", *pixels.shape)
    return b"".join((header, shape, device, payload))


def _check_fields(device_id: str, seq: int, capture_ns: int, label: int | None, flags: int,
                  shape: tuple[int, ...]) -> tuple[int, int]:
    """(flags byte, label field) for the fields every frame kind has; FrameEncodeError naming a bad one."""
    if not 1 <= len(shape) <= MAX_NDIM:
        raise FrameEncodeError(f"frames have 1..{MAX_NDIM} dimensions, got shape {tuple(shape)}")
    if any(d <= 0 or d > 0xFFFFFFFF for d in shape):
        raise FrameEncodeError(f"every dimension must be in 1..2**32-1, got shape {tuple(shape)}")
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise FrameEncodeError(f"device id must match {DEVICE_ID_RE.pattern}, got {device_id!r}")
    if not 0 <= seq < 2**64:
        raise FrameEncodeError(f"seq must fit in uint64, got {seq}")
    if not -(2**63) <= capture_ns < 2**63:
        raise FrameEncodeError(f"capture_ns must fit in int64, got {capture_ns}")
    flags &= ~FLAG_HAS_LABEL
    if flags & ~KNOWN_FLAGS:
        raise FrameEncodeError(f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:02x}")
    if label is None:
        return flags, 0
    if not 0 <= label <= 0xFFFF:
        raise FrameEncodeError(f"label must fit in uint16, got {label}")
    return flags | FLAG_HAS_LABEL, int(label)


def decode(data: bytes | bytearray | memoryview, limits: DecodeLimits = DecodeLimits()) -> Frame:
    """Parse one frame. Raises FrameDecodeError whose `reason` is in DECODE_REASONS.

    The returned pixels are a view into `data` (no copy; read-only when `data` is bytes).
    """
    view = memoryview(data).cast("B")  # byte-addressed, whatever the source item size
    fields = _read_header(view, VERSION, HEADER_SIZE)
    _version, dtype, ndim, flags, label, id_len, _reserved, payload_len, seq, capture_ns = fields
    body = HEADER_SIZE + 4 * ndim + id_len
    if view.nbytes < body:
        raise FrameDecodeError("short_header", f"need {body} bytes for shape and device id, got {view.nbytes}")
    shape = struct.unpack_from(f"<{ndim}I", view, HEADER_SIZE)
    device_id = _device_id(view, HEADER_SIZE + 4 * ndim, id_len)
    _check_shape(shape, limits)
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no int64 wrap-around whatever the limits
    _check_payload(view, body, payload_len, expected, f"shape {shape} of {dtype}")
    pixels = np.frombuffer(view, dtype=dtype, count=expected // dtype.itemsize, offset=body).reshape(shape)
    return Frame(
        device_id=device_id,
        seq=seq,
        capture_ns=capture_ns,
        pixels=pixels,
        label=label,
        flags=flags,
    )


def _read_header(view: memoryview, version_wanted: int, min_size: int) -> tuple:
    """The common 32-byte header's fields after the magic (dtype as np.dtype), checked in the spec's order."""
    if view.nbytes < min_size:
        raise FrameDecodeError("short_header", f"need {min_size} header bytes, got {view.nbytes}")
    (magic, version, code, ndim, flags, label, id_len, byte11,
     payload_len, seq, capture_ns) = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise FrameDecodeError("bad_magic", f"expected {MAGIC!r}, got {bytes(magic)!r}")
    if version != version_wanted:
        kinds = {VERSION: "a pixel frame: decode", TENSOR_VERSION: "a tensor frame: decode_tensor"}
        hint = f" (version {version} is {kinds[version]})" if version in kinds else ""
        raise FrameDecodeError("unknown_version", f"version {version}, this decoder reads {version_wanted}{hint}")
    dtype = DTYPE_CODES.get(code)
    if dtype is None:
        raise FrameDecodeError("unknown_dtype", f"dtype code {code}, known codes {sorted(DTYPE_CODES)}")
    if not 1 <= ndim <= MAX_NDIM:
        raise FrameDecodeError("bad_ndim", f"ndim {ndim}, must be 1..{MAX_NDIM}")
    if flags & ~KNOWN_FLAGS:
        raise FrameDecodeError("unknown_flags", f"flag bits 0x{flags & ~KNOWN_FLAGS:02x} are not defined")
    if not 1 <= id_len <= MAX_DEVICE_ID_LEN:
        raise FrameDecodeError("bad_device_id", f"device id length {id_len}, must be 1..{MAX_DEVICE_ID_LEN}")
    label = label if flags & FLAG_HAS_LABEL else None
    return version, dtype, ndim, flags, label, id_len, byte11, payload_len, seq, capture_ns


def _device_id(view: memoryview, offset: int, id_len: int) -> str:
    device_bytes = bytes(view[offset: offset + id_len])
    device_id = device_bytes.decode("ascii", errors="replace")
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise FrameDecodeError("bad_device_id", f"device id {device_bytes!r} must match {DEVICE_ID_RE.pattern}")
    return device_id


def _check_payload(view: memoryview, body: int, payload_len: int, expected: int, what: str) -> None:
    if payload_len != expected:
        raise FrameDecodeError("payload_size", f"header says {payload_len} payload bytes, {what} needs {expected}")
    actual = view.nbytes - body
    if actual != payload_len:
        raise FrameDecodeError("payload_size", f"header says {payload_len} bytes, payload has {actual}")


def _check_shape(shape: tuple[int, ...], limits: DecodeLimits) -> None:
    if any(d == 0 for d in shape):
        raise FrameDecodeError("shape_limit", f"shape {shape} has a zero dimension")
    if max(shape) > limits.max_dim:
        raise FrameDecodeError("shape_limit", f"shape {shape} has a dimension over the limit {limits.max_dim}")
    elements = math.prod(shape)
    if elements > limits.max_elements:
        raise FrameDecodeError("shape_limit", f"shape {shape} has {elements} elements, limit {limits.max_elements}")


# --- tensor frames (version 2) ------------------------------------------------------------------------------
#
# The 32-byte header of version 1 with version 2 and byte 11 = codec code (reserved in version 1), then
# TENSOR_EXT, then: shape uint32[ndim] (per-sample tensor at the cut), cut id (ASCII), device id (ASCII),
# scales float32[scale count], codes (payload length bytes). docs/wire-format.md has the table.

TENSOR_EXT = struct.Struct("<BBH8s")  # cut id length, codec parameter (pq8: dsub), scale count, model hash
TENSOR_HEADER_SIZE = HEADER_SIZE + TENSOR_EXT.size  # 44
MAX_CUT_ID_LEN = 64
MODEL_HASH_LEN = 8  # first 8 bytes of the sha256 of the partitioned model's file
CUT_ID_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")  # e.g. "edge_cnn@pool1", "edge_cnn.qcnn@fc1"


# --- tensor frames (version 2) ------------------------------------------------------------------------------
#
# The 32-byte header with version 2 and byte 11 = codec code (reserved in version 1), then TENSOR_EXT, then
# shape uint32[ndim] (per-sample tensor at the cut), cut id, device id, scales float32[count], codes.

TENSOR_EXT = struct.Struct("<BBH8s")  # cut id length, codec parameter (pq8: dsub), scale count, model hash
TENSOR_HEADER_SIZE = HEADER_SIZE + TENSOR_EXT.size  # 44
MAX_CUT_ID_LEN = 64
MODEL_HASH_LEN = 8  # first 8 bytes of the sha256 of the partitioned model's file
CUT_ID_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")  # e.g. "edge_cnn@pool1", "edge_cnn.qcnn@fc1"


@dataclass(frozen=True)
class TensorFrame:
    """The tensor at a cut of a partitioned model, for one sample.

    shape: per-sample tensor shape at the cut (no batch dim), e.g. (16, 12, 12).
    codes: array [*tc.code_shape(codec, shape, pq_dsub)] of tc.CODEC_DTYPES[codec].
    scales: float32 [tc.scale_count(codec, shape)] (int8 codecs; empty otherwise).
    model_hash: MODEL_HASH_LEN bytes naming the model file the cut was made from.
    """

    device_id: str
    seq: int
    capture_ns: int
    cut_id: str
    model_hash: bytes
    codec: str
    shape: tuple[int, ...]
    codes: np.ndarray
    scales: np.ndarray
    label: int | None = None
    flags: int = 0
    pq_dsub: int = 0

    @property
    def noisy(self) -> bool:
        return bool(self.flags & FLAG_NOISY)

    def values(self, pq: tc.PQCodebook | None = None) -> np.ndarray:
        """The decoded tensor, float32 [*shape] (pq8 needs the cut's codebook)."""
        return tc.decode_codes(self.codes[None], self.scales[None], self.codec, pq)[0]


def tensor_frames(x: np.ndarray, codec: str, cut: tc.CutSpec, device_id: str, seqs, capture_ns,
                  labels=None, flags: int = 0, pq: tc.PQCodebook | None = None) -> list[TensorFrame]:
    """Encode a batch x float32 [N, *cut.shape] with `codec` into N TensorFrames of `cut`.

    seqs, capture_ns: N ints each, or one int for every frame; labels: N ints/None, or None.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[1:] != cut.shape:
        raise ValueError(f"cut {cut.cut_id} carries [N, {', '.join(map(str, cut.shape))}], got {list(x.shape)}")
    codes, scales = tc.compute_codes(x, codec, pq)
    n = len(x)
    seqs = [seqs] * n if isinstance(seqs, int) else list(seqs)
    capture_ns = [capture_ns] * n if isinstance(capture_ns, int) else list(capture_ns)
    labels = [None] * n if labels is None else list(labels)
    dsub = pq.dsub if codec == "pq8" else 0
    return [TensorFrame(device_id, int(seqs[i]), int(capture_ns[i]), cut.cut_id, cut.model_hash, codec,
                        cut.shape, codes[i], scales[i], labels[i], flags, dsub) for i in range(n)]


def tensor_frame_size(codec: str, shape: tuple[int, ...], cut_id: str, device_id: str, pq_dsub: int = 0) -> int:
    """Exact bytes of one encoded tensor frame: header, shape, ids, scales and codes."""
    return (TENSOR_HEADER_SIZE + 4 * len(shape) + len(cut_id) + len(device_id)
            + tc.payload_bytes(codec, tuple(shape), pq_dsub))


def encode_tensor(frame: TensorFrame) -> bytes:
    """Serialize a tensor frame. Raises FrameEncodeError for values the format cannot carry."""
    shape = tuple(frame.shape)
    flags, label = _check_fields(frame.device_id, frame.seq, frame.capture_ns, frame.label, frame.flags, shape)
    if frame.codec not in tc.CODEC_CODES:
        raise FrameEncodeError(f"unknown tensor codec {frame.codec!r}; known: {', '.join(tc.CODECS)}")
    problem = _codec_problem(frame.codec, shape, frame.pq_dsub)
    if problem:
        raise FrameEncodeError(problem)
    dtype, want = tc.CODEC_DTYPES[frame.codec], tc.code_shape(frame.codec, shape, frame.pq_dsub)
    codes = np.asarray(frame.codes)
    if codes.dtype.kind != dtype.kind or codes.dtype.itemsize != dtype.itemsize or codes.shape != want:
        raise FrameEncodeError(f"codec {frame.codec!r} at shape {shape} needs codes {dtype} {list(want)}, "
                               f"got {codes.dtype} {list(codes.shape)}")
    scales = np.asarray(frame.scales, dtype=np.float32).reshape(-1)
    count = tc.scale_count(frame.codec, shape)
    if len(scales) != count or not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise FrameEncodeError(f"codec {frame.codec!r} needs {count} finite scales > 0, got {scales[:8].tolist()}")
    if not CUT_ID_RE.fullmatch(frame.cut_id):
        raise FrameEncodeError(f"cut id must match {CUT_ID_RE.pattern}, got {frame.cut_id!r}")
    if len(frame.model_hash) != MODEL_HASH_LEN:
        raise FrameEncodeError(f"model hash must be {MODEL_HASH_LEN} bytes, got {len(frame.model_hash)}")
    payload = np.ascontiguousarray(codes, dtype=dtype).tobytes()
    header = HEADER.pack(MAGIC, TENSOR_VERSION, _CODE_OF[dtype], len(shape), flags, label, len(frame.device_id),
                         tc.CODEC_CODES[frame.codec], len(payload), frame.seq, frame.capture_ns)
    ext = TENSOR_EXT.pack(len(frame.cut_id), frame.pq_dsub, count, bytes(frame.model_hash))
    return b"".join((header, ext, struct.pack(f"<{len(shape)}I", *shape), frame.cut_id.encode("ascii"),
                     frame.device_id.encode("ascii"), scales.astype("<f4").tobytes(), payload))


def _codec_problem(codec: str, shape: tuple[int, ...], dsub: int) -> str:
    """Why `codec` with parameter `dsub` cannot carry a tensor of `shape` ('' when it can)."""
    if codec == "pq8":
        return "" if dsub >= 1 and shape[0] % dsub == 0 else f"pq8 dsub {dsub} must divide channels {shape[0]}"
    if dsub:
        return f"codec {codec!r} takes no parameter, got {dsub}"
    if codec == "int8-channel" and len(shape) < 2:
        return f"int8-channel needs a channel axis (ndim >= 2), got shape {shape}"
    return ""


def decode_tensor(data: bytes | bytearray | memoryview, limits: DecodeLimits = DecodeLimits()) -> TensorFrame:
    """Parse one tensor frame (version 2). Raises FrameDecodeError whose `reason` is in DECODE_REASONS.

    Codes and scales are views into `data` (no copy). Whether the cut is known, and the shape and
    codec are the cut's, is `check_cut`'s job: the frame alone does not say.
    """
    view = memoryview(data).cast("B")
    fields = _read_header(view, TENSOR_VERSION, TENSOR_HEADER_SIZE)
    _version, dtype, ndim, flags, label, id_len, codec_code, payload_len, seq, capture_ns = fields
    cut_len, dsub, count, model_hash = TENSOR_EXT.unpack_from(view, HEADER_SIZE)
    if not 1 <= cut_len <= MAX_CUT_ID_LEN:
        raise FrameDecodeError("bad_cut_id", f"cut id length {cut_len}, must be 1..{MAX_CUT_ID_LEN}")
    at = TENSOR_HEADER_SIZE + 4 * ndim
    body = at + cut_len + id_len + 4 * count
    if view.nbytes < body:
        raise FrameDecodeError("short_header", f"need {body} bytes for shape, ids and {count} scales, "
                                               f"got {view.nbytes}")
    shape = struct.unpack_from(f"<{ndim}I", view, TENSOR_HEADER_SIZE)
    cut_bytes = bytes(view[at: at + cut_len])
    cut_id = cut_bytes.decode("ascii", errors="replace")
    if not CUT_ID_RE.fullmatch(cut_id):
        raise FrameDecodeError("bad_cut_id", f"cut id {cut_bytes!r} must match {CUT_ID_RE.pattern}")
    device_id = _device_id(view, at + cut_len, id_len)
    _check_shape(shape, limits)
    codec = tc.CODEC_NAMES.get(codec_code)
    if codec is None:
        raise FrameDecodeError("unknown_codec", f"codec code {codec_code}, known codes {sorted(tc.CODEC_NAMES)}")
    if tc.CODEC_DTYPES[codec] != dtype:
        raise FrameDecodeError("unknown_codec", f"codec {codec!r} carries {tc.CODEC_DTYPES[codec]}, frame says {dtype}")
    problem = _codec_problem(codec, shape, dsub)
    if problem:
        raise FrameDecodeError("unknown_codec", problem)
    want = tc.scale_count(codec, shape)
    if count != want:
        raise FrameDecodeError("bad_scale", f"codec {codec!r} at shape {shape} needs {want} scales, frame has {count}")
    scales = np.frombuffer(view, dtype="<f4", count=count, offset=body - 4 * count)
    bad = ~np.isfinite(scales) | (scales <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise FrameDecodeError("bad_scale", f"scale {i} is {float(scales[i])!r}; scales must be finite and > 0")
    cshape = tc.code_shape(codec, shape, dsub)
    expected = math.prod(cshape) * dtype.itemsize
    _check_payload(view, body, payload_len, expected, f"codec {codec!r} at shape {shape}")
    codes = np.frombuffer(view, dtype=dtype, count=math.prod(cshape), offset=body).reshape(cshape)
    return TensorFrame(device_id, seq, capture_ns, cut_id, model_hash, codec, shape, codes, scales, label, flags,
                       dsub)


def decode_any(data: bytes | bytearray | memoryview, limits: DecodeLimits = DecodeLimits()) -> Frame | TensorFrame:
    """A pixel frame (version 1) or a tensor frame (version 2), by the version byte."""
    view = memoryview(data).cast("B")
    if view.nbytes > 4 and view[4] == TENSOR_VERSION:
        return decode_tensor(view, limits)
    return decode(view, limits)


def check_cut(frame: TensorFrame, cuts: tc.CutSpec | Mapping[str, tc.CutSpec]) -> tc.CutSpec:
    """The spec of the frame's cut, after checking the frame against it; FrameDecodeError otherwise.

    cuts: the cuts this receiver serves (one spec, or cut id -> spec). Reasons: `unknown_cut` (cut id
    not served, or model hash not the served model's), `cut_shape`, `cut_codec` (codec not offered
    there, or a pq8 dsub other than the cut's codebook's).
    """
    specs = {cuts.cut_id: cuts} if isinstance(cuts, tc.CutSpec) else cuts
    spec = specs.get(frame.cut_id)
    if spec is None:
        known = ", ".join(sorted(specs)[:8]) or "none"
        raise FrameDecodeError("unknown_cut", f"cut id {frame.cut_id!r} is not served here (known: {known})")
    if bytes(frame.model_hash) != bytes(spec.model_hash):
        raise FrameDecodeError("unknown_cut", f"cut {frame.cut_id} of model {bytes(frame.model_hash).hex()}, "
                                              f"served model is {bytes(spec.model_hash).hex()}")
    if tuple(frame.shape) != spec.shape:
        raise FrameDecodeError("cut_shape", f"cut {frame.cut_id} carries shape {spec.shape}, frame has "
                                            f"{tuple(frame.shape)}")
    if frame.codec not in spec.codecs or (frame.codec == "pq8" and frame.pq_dsub != spec.pq_dsub):
        offered = ", ".join(spec.codecs) + (f" (pq8 dsub {spec.pq_dsub})" if "pq8" in spec.codecs else "")
        raise FrameDecodeError("cut_codec", f"cut {frame.cut_id} offers {offered}, frame has {frame.codec!r}"
                                            + (f" dsub {frame.pq_dsub}" if frame.codec == "pq8" else ""))
    return spec
