"""Property tests: whatever bytes arrive, decode returns a Frame or raises FrameDecodeError."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from publishers import wire
from publishers.errors import FrameDecodeError

VALID = wire.encode(wire.Frame("dev0", 7, 1_700_000_000_000_000_000, np.arange(784, dtype=np.uint8).reshape(28, 28), 3))
LIMITS = wire.DecodeLimits(max_elements=1 << 16, max_dim=1 << 12)


def _decode_or_reason(data: bytes) -> str:
    try:
        frame = wire.decode(data, LIMITS)
    except FrameDecodeError as err:
        assert err.reason in wire.DECODE_REASONS
        return err.reason
    # Anything accepted is self-consistent: it re-encodes to a frame with the same fields.
    again = wire.decode(wire.encode(frame), LIMITS)
    assert (again.device_id, again.seq, again.capture_ns, again.label, again.flags) == (
        frame.device_id, frame.seq, frame.capture_ns, frame.label, frame.flags)
    assert again.pixels.shape == frame.pixels.shape and again.pixels.tobytes() == frame.pixels.tobytes()
    return "ok"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    _decode_or_reason(data)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, len(VALID)))
def test_mutated_valid_frames_decode_or_fail_cleanly(edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(VALID)
    for pos, value in edits:
        data[pos] = value
    _decode_or_reason(bytes(data[:cut]))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(wire.DTYPE_CODES)), st.lists(st.integers(1, 9), min_size=1, max_size=4),
       st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1), st.none() | st.integers(0, 0xFFFF),
       st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True), st.integers(0, 2**32 - 1))
def test_any_valid_frame_round_trips(code, shape, seq, capture_ns, label, device_id, seed) -> None:
    dtype = wire.DTYPE_CODES[code]
    rng = np.random.default_rng(seed)
    pixels = rng.integers(-100, 100, size=shape).astype(dtype)
    frame = wire.Frame(device_id, seq, capture_ns, pixels, label, wire.FLAG_NOISY if seed % 2 else 0)
    back = wire.decode(wire.encode(frame))
    assert (back.device_id, back.seq, back.capture_ns, back.label, back.noisy) == (
        device_id, seq, capture_ns, label, bool(seed % 2))
    assert back.pixels.dtype == dtype and np.array_equal(back.pixels, pixels, equal_nan=dtype.kind == "f")
