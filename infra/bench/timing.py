"""Latency measurement: warm up, time single calls with perf_counter_ns, summarise as median and p90."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Latency:
    """Summary of timed calls. median_ms, p90_ms: milliseconds per call; runs: calls timed."""

    median_ms: float
    p90_ms: float
    runs: int


def measure_latency(
    fn: Callable[[], object], repeats: int, warmup: int = 3, min_repeats: int = 5, max_seconds: float | None = None
) -> Latency:
    """Time `repeats` calls of `fn()` after `warmup` untimed calls.

    max_seconds: stop early once this much time was spent timing and at least
    `min_repeats` calls were made (bounds the run for slow variants); the
    number of calls actually timed is in ``Latency.runs``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        fn()
    times_ns = []
    budget_ns = None if max_seconds is None else int(max_seconds * 1e9)
    spent_ns = 0
    for i in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        dt = time.perf_counter_ns() - t0
        times_ns.append(dt)
        spent_ns += dt
        if budget_ns is not None and spent_ns > budget_ns and i + 1 >= min_repeats:
            break
    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    return Latency(median_ms=float(np.median(ms)), p90_ms=float(np.percentile(ms, 90)), runs=len(ms))


def measure_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, block: int = 10, warmup: int = 3, min_repeats: int = 5,
    max_seconds: float | None = None, pause_s: float = 0.0,
) -> dict[str, Latency]:
    """Time `repeats` calls of each fn in rounds: `block` calls of one, then `block` of the next, and so on.

    On a shared host the speed of the machine drifts during a run; timing the variants of one
    comparison in alternating blocks exposes them all to the same drift, so their ratios hold
    even when the absolute figures move. Blocks (not single calls) keep one variant's thread
    pool winding down (onnxruntime's workers spin for a while after a run) from taxing only
    the first call of the next. max_seconds: a fn stops once this much time was spent timing
    it and it made at least `min_repeats` calls.
    """
    if repeats < 1 or block < 1:
        raise ValueError(f"repeats and block must be >= 1, got {repeats} and {block}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times_ns: dict[str, list[int]] = {name: [] for name in fns}
    budget_ns = None if max_seconds is None else int(max_seconds * 1e9)

    def done(name: str) -> bool:
        t = times_ns[name]
        return len(t) >= repeats or (budget_ns is not None and sum(t) > budget_ns and len(t) >= min_repeats)

    while not all(done(name) for name in fns):
        for name, fn in fns.items():
            for _ in range(block):
                if done(name):
                    break
                t0 = time.perf_counter_ns()
                fn()
                times_ns[name].append(time.perf_counter_ns() - t0)
            if pause_s:
                time.sleep(pause_s)
    out = {}
    for name, t in times_ns.items():
        ms = np.asarray(t, dtype=np.float64) / 1e6
        out[name] = Latency(median_ms=float(np.median(ms)), p90_ms=float(np.percentile(ms, 90)), runs=len(ms))
    return out
