"""Split-computing profiles: measured per-segment latency on each tier's runtime, and each link's bandwidth and RTT.

Latency is measured, never estimated: ``profile_partition`` runs every head, every tail and every
segment between adjacent cuts (the per-layer costs) of a partition on a runtime at batch 1 and at
each tier's typical batch, and records the median wall time per call in the manifest::

    cut["profile"][runtime] = {"head_ms": {"1": 0.05, "32": 0.61}, "tail_ms": {...}}
    manifest["whole_ms"][runtime] = {"1": ..., "32": ...}
    manifest["segments"] = [{"from": "input", "to": "relu1", "ms": {runtime: {"1": ..., "32": ...}}}, ...]

Runtimes are loaded through a function passed in (``load(key, path) -> runtime`` with ``warmup()`` and
``predict(x)``, i.e. ``edge_workers.runtime.load_runtime``): this layer sits below the tiers.

Links are data: ``LinkProfile`` (bandwidth in bit/s, round-trip time in ms), a few nominal
``KNOWN_LINKS`` and a config override (``links_from_config``). Measuring them from the pipeline's
own traffic is left to the wiring.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Loader = Callable[[str, str], Any]  # (runtime key, model path) -> object with warmup() and predict(x)


@dataclass(frozen=True)
class LinkProfile:
    """One network hop: bandwidth_bps in bit/s (> 0), rtt_ms round-trip time in milliseconds (>= 0)."""

    name: str
    bandwidth_bps: float
    rtt_ms: float

    def __post_init__(self):
        if not self.bandwidth_bps > 0 or not np.isfinite(self.bandwidth_bps):
            raise ValueError(f"link {self.name}: bandwidth must be finite and > 0 bit/s, got {self.bandwidth_bps!r}")
        if not self.rtt_ms >= 0 or not np.isfinite(self.rtt_ms):
            raise ValueError(f"link {self.name}: RTT must be finite and >= 0 ms, got {self.rtt_ms!r}")

    def transfer_ms(self, nbytes: int) -> float:
        """Serialization time of `nbytes` at the link's bandwidth, milliseconds (no RTT)."""
        return 8.0 * nbytes / self.bandwidth_bps * 1e3


# Nominal figures for planning before anything is measured (not measurements of this machine).
KNOWN_LINKS = {
    "loopback": LinkProfile("loopback", 10e9, 0.05),
    "ethernet": LinkProfile("ethernet", 1e9, 0.5),
    "wifi": LinkProfile("wifi", 50e6, 5.0),
    "lte": LinkProfile("lte", 10e6, 50.0),
    "3g": LinkProfile("3g", 1e6, 150.0),
    "lora-ish": LinkProfile("lora-ish", 50e3, 500.0),
}


def links_from_config(cfg: Mapping[str, Mapping[str, Any]] | None,
                      known: Mapping[str, LinkProfile] = KNOWN_LINKS) -> dict[str, LinkProfile]:
    """KNOWN_LINKS with config overrides:
    {"wifi": {"bandwidth_bps": 2e7}, "mylink": {"bandwidth_bps": .., "rtt_ms": ..}}.

    A new link needs both fields; unknown keys are a ValueError naming them.
    """
    links = dict(known)
    for name, fields in (cfg or {}).items():
        extra = set(fields) - {"bandwidth_bps", "rtt_ms"}
        if extra:
            raise ValueError(f"link {name}: unknown fields {sorted(extra)}; known: bandwidth_bps, rtt_ms")
        if name in links:
            links[name] = replace(links[name], **{k: float(v) for k, v in fields.items()})
        elif set(fields) == {"bandwidth_bps", "rtt_ms"}:
            links[name] = LinkProfile(name, float(fields["bandwidth_bps"]), float(fields["rtt_ms"]))
        else:
            raise ValueError(f"new link {name} needs bandwidth_bps and rtt_ms, got {sorted(fields)}")
    return links


@dataclass(frozen=True)
class TierProfile:
    """A tier as the planner sees it: the runtime that runs its segments and its typical batch."""

    name: str
    runtime: str
    batch: int = 1


def time_call(fn: Callable[[], Any], min_seconds: float = 0.2, min_repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds, over at least `min_repeats` calls and `min_seconds`."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _latencies(load: Loader, key: str, path: str | Path, batches: Sequence[int], min_seconds: float) -> dict:
    rt = load(key, str(path))
    rt.warmup()
    rng = np.random.default_rng(0)
    out = {}
    for b in batches:
        x = rng.random((b, *rt.input_shape), dtype=np.float32)
        out[str(b)] = round(time_call(lambda x=x: rt.predict(x), min_seconds), 4)
    return out


def profile_partition(manifest: dict, out_dir: str | Path, source: str | Path, load: Loader,
                      runtimes: Sequence[str], batches: Sequence[int] = (1, 32), min_seconds: float = 0.2,
                      progress: Callable[[str], None] = lambda line: None) -> dict:
    """Measure heads, tails, the whole model and the segments between adjacent cuts; returns `manifest` updated."""
    import onnx

    from modelstore.partition import find_cuts, model_name, segment

    out_dir = Path(out_dir)
    cuts = manifest["cuts"]
    steps = len(runtimes) * (2 * len(cuts) + 1)
    done = 0
    manifest["profile_batches"] = [int(b) for b in batches]
    manifest["whole_ms"] = {}
    for key in runtimes:
        manifest["whole_ms"][key] = _latencies(load, key, source, batches, min_seconds)
        for cut in cuts:
            prof = cut.setdefault("profile", {})
            prof[key] = {part + "_ms": _latencies(load, key, out_dir / cut[part]["file"], batches, min_seconds)
                         for part in ("head", "tail")}
            done += 2
            progress(f"profile: {cut['id']} on {key} [{done + 1}/{steps}] head {prof[key]['head_ms']} ms, "
                     f"tail {prof[key]['tail_ms']} ms")
        done += 1
    model = onnx.load(str(source))
    by_id = {c.cut_id: c for c in find_cuts(model, model_name(source))}
    chain = [None] + [by_id[c["id"]] for c in cuts] + [None]
    segments = []
    with tempfile.TemporaryDirectory() as tmp:
        for a, b in zip(chain, chain[1:], strict=False):
            path = Path(tmp) / "segment.onnx"
            onnx.save(segment(model, a, b), str(path))
            ms = {key: _latencies(load, key, path, batches, min_seconds) for key in runtimes}
            segments.append({"from": a.point if a else "input", "to": b.point if b else "output", "ms": ms})
    manifest["segments"] = segments
    progress(f"profile: {len(segments)} segments measured on {', '.join(runtimes)}")
    return manifest
