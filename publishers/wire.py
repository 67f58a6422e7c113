"""The frame wire format: a versioned 32-byte binary header, shape, device id, raw pixels.

The layout is specified in docs/wire-format.md; this module is the only
Python implementation. All integers are little-endian.

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
from dataclasses import dataclass

import numpy as np

from publishers.errors import FrameDecodeError, FrameEncodeError

MAGIC = b"EQFR"
VERSION = 1
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
    if not 1 <= pixels.ndim <= MAX_NDIM:
        raise FrameEncodeError(f"frames have 1..{MAX_NDIM} dimensions, got shape {pixels.shape}")
    if any(d <= 0 or d > 0xFFFFFFFF for d in pixels.shape):
        raise FrameEncodeError(f"every dimension must be in 1..2**32-1, got shape {pixels.shape}")
    if not DEVICE_ID_RE.fullmatch(frame.device_id):
        raise FrameEncodeError(f"device id must match {DEVICE_ID_RE.pattern}, got {frame.device_id!r}")
    if not 0 <= frame.seq < 2**64:
        raise FrameEncodeError(f"seq must fit in uint64, got {frame.seq}")
    if not -(2**63) <= frame.capture_ns < 2**63:
        raise FrameEncodeError(f"capture_ns must fit in int64, got {frame.capture_ns}")
    flags = frame.flags & ~FLAG_HAS_LABEL
    if flags & ~KNOWN_FLAGS:
        raise FrameEncodeError(f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:02x}")
    label = 0
    if frame.label is not None:
        if not 0 <= frame.label <= 0xFFFF:
            raise FrameEncodeError(f"label must fit in uint16, got {frame.label}")
        label = int(frame.label)
        flags |= FLAG_HAS_LABEL
    payload = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    device = frame.device_id.encode("ascii")
    header = HEADER.pack(
        MAGIC, VERSION, code, pixels.ndim, flags, label, len(device), 0,
        len(payload), frame.seq, frame.capture_ns,
    )
    shape = struct.pack(f"<{pixels.ndim}I", *pixels.shape)
    return b"".join((header, shape, device, payload))


def decode(data: bytes | bytearray | memoryview, limits: DecodeLimits = DecodeLimits()) -> Frame:
    """Parse one frame. Raises FrameDecodeError whose `reason` is in DECODE_REASONS.

    The returned pixels are a view into `data` (no copy; read-only when `data` is bytes).
    """
    view = memoryview(data).cast("B")  # byte-addressed, whatever the source item size
    if view.nbytes < HEADER_SIZE:
        raise FrameDecodeError("short_header", f"need {HEADER_SIZE} header bytes, got {view.nbytes}")
    (magic, version, code, ndim, flags, label, id_len, _reserved,
     payload_len, seq, capture_ns) = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise FrameDecodeError("bad_magic", f"expected {MAGIC!r}, got {bytes(magic)!r}")
    if version != VERSION:
        raise FrameDecodeError("unknown_version", f"version {version}, this decoder reads {VERSION}")
    dtype = DTYPE_CODES.get(code)
    if dtype is None:
        raise FrameDecodeError("unknown_dtype", f"dtype code {code}, known codes {sorted(DTYPE_CODES)}")
    if not 1 <= ndim <= MAX_NDIM:
        raise FrameDecodeError("bad_ndim", f"ndim {ndim}, must be 1..{MAX_NDIM}")
    if flags & ~KNOWN_FLAGS:
        raise FrameDecodeError("unknown_flags", f"flag bits 0x{flags & ~KNOWN_FLAGS:02x} are not defined")
    if not 1 <= id_len <= MAX_DEVICE_ID_LEN:
        raise FrameDecodeError("bad_device_id", f"device id length {id_len}, must be 1..{MAX_DEVICE_ID_LEN}")
    body = HEADER_SIZE + 4 * ndim + id_len
    if view.nbytes < body:
        raise FrameDecodeError("short_header", f"need {body} bytes for shape and device id, got {view.nbytes}")
    shape = struct.unpack_from(f"<{ndim}I", view, HEADER_SIZE)
    device_bytes = bytes(view[HEADER_SIZE + 4 * ndim : body])
    device_id = device_bytes.decode("ascii", errors="replace")
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise FrameDecodeError("bad_device_id", f"device id {device_bytes!r} must match {DEVICE_ID_RE.pattern}")
    _check_shape(shape, limits)
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no int64 wrap-around whatever the limits
    if payload_len != expected:
        raise FrameDecodeError(
            "payload_size", f"header says {payload_len} payload bytes, shape {shape} of {dtype} needs {expected}"
        )
    actual = view.nbytes - body
    if actual != payload_len:
        raise FrameDecodeError("payload_size", f"header says {payload_len} bytes, payload has {actual}")
    pixels = np.frombuffer(view, dtype=dtype, count=expected // dtype.itemsize, offset=body).reshape(shape)
    return Frame(
        device_id=device_id,
        seq=seq,
        capture_ns=capture_ns,
        pixels=pixels,
        label=label if flags & FLAG_HAS_LABEL else None,
        flags=flags,
    )


def _check_shape(shape: tuple[int, ...], limits: DecodeLimits) -> None:
    if any(d == 0 for d in shape):
        raise FrameDecodeError("shape_limit", f"shape {shape} has a zero dimension")
    if max(shape) > limits.max_dim:
        raise FrameDecodeError("shape_limit", f"shape {shape} has a dimension over the limit {limits.max_dim}")
    elements = math.prod(shape)
    if elements > limits.max_elements:
        raise FrameDecodeError("shape_limit", f"shape {shape} has {elements} elements, limit {limits.max_elements}")
