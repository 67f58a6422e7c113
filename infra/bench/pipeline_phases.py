"""One phase of `edgeq bench pipeline`: publish at a rate, collect every answer, measure rates, latency, CPU
(in total and per process group).

A phase ends when every frame the broker acknowledged is answered (or counted
as dropped by the edge), or when nothing arrived for QUIET_S seconds, bounded
by the run's drain timeout. Rates and latencies cover the steady window: the
phase minus its warmup.
"""

from __future__ import annotations

import collections
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

_PHASE_IDS = itertools.count()  # device ids are fresh in every phase: (device, seq) stays unique in a run
POLL_S = 0.5
QUIET_S = 3.0  # a phase is over when nothing arrived for this long (and not every frame is accounted for)


@dataclass
class Phase:
    """One phase of one mode. Counts are over the whole phase; rates and latencies over its steady window."""

    name: str                 # "probe 400/s" or "25 %", ...
    offered: float            # frames/s asked of the publishers
    seconds: float            # publishing time
    sent: int                 # frames the broker acknowledged
    device_bytes: int         # wire bytes the devices sent
    answered: int             # unique answers (ceiling: frames received)
    duplicates: int = 0
    dropped: int = 0          # frames the edge dropped (queue full, shutdown)
    rate: float = 0.0         # answers/s arriving in the steady window
    latency_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))  # frames captured in the steady window
    cpu_s: float = 0.0        # pipeline processes, publishing and draining
    peak_rss: int = 0
    uplink_bytes: int = 0     # edge -> cloud payload bytes
    result_bytes: int = 0     # result messages (ceiling: bytes received)
    labelled: int = 0
    correct: int = 0
    tiers: collections.Counter = field(default_factory=collections.Counter)
    captured_rate: float = 0.0  # frames/s the devices actually generated in the steady window
    cpu_groups: dict = field(default_factory=dict)  # CPU seconds per process group, load generator included

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latency_ms, q)) if len(self.latency_ms) else float("nan")

    def sustained(self, fraction: float, max_p99_ms: float) -> bool:
        """Answers kept up with what the devices captured, without a queue building up (bounded p99)."""
        return self.rate >= fraction * self.captured_rate and self.pct(99) <= max_p99_ms

    def publisher_limited(self, fraction: float) -> bool:
        """The devices could not capture at the offered rate (so the probe did not test it)."""
        return self.captured_rate < fraction * self.offered

    @property
    def throughput(self) -> float:
        """Frames/s both captured and answered in the steady window."""
        return min(self.rate, self.captured_rate)


def _steady(arrival_ns: np.ndarray, capture_ns: np.ndarray, latency_ms: np.ndarray, t0_ns: int,
            cfg, seconds: float) -> tuple[float, np.ndarray]:
    """Over the steady window [t0 + warmup, t0 + seconds]: (answers/s arriving, latencies of the frames
    captured in it)."""
    lo, hi = t0_ns + int(cfg.warmup_s * 1e9), t0_ns + int(seconds * 1e9)
    span = max(seconds - cfg.warmup_s, 1e-9)
    captured = (capture_ns >= lo) & (capture_ns < hi)
    rate = float(np.count_nonzero((arrival_ns >= lo) & (arrival_ns < hi))) / span
    return rate, latency_ms[captured]


def _captured_rate(rep, cfg, seconds: float) -> float:
    """Frames/s the devices generated in the steady window (counted by the publisher processes)."""
    return rep.window_frames / max(seconds - cfg.warmup_s, 1e-9)


class _Answers:
    """Unique results of one phase, from the results sink (a message holds one or several results of a device).

    messages and bytes count MQTT messages and their payload bytes; result_count the results in valid messages
    (duplicates included), so duplicates = result_count - len(seen).
    """

    def __init__(self):
        from publishers import results

        self._decode, self._error = results.decode_all, results.ResultDecodeError
        self.seen: set[tuple[str, int]] = set()
        self.messages = self.result_count = self.bytes = self.labelled = self.correct = 0
        self.tiers: collections.Counter = collections.Counter()
        self.arrival, self.latency = [], []

    def add(self, arrival_ns: np.ndarray, payloads: list, nbytes: int) -> int:
        """Count a batch from the sink; returns the messages taken."""
        self.bytes += nbytes
        for t, payload in zip(arrival_ns.tolist(), payloads, strict=True):
            self.messages += 1
            try:
                rs = self._decode(payload)
            except self._error:
                continue
            self.result_count += len(rs)
            for r in rs:
                if (r.device, r.seq) in self.seen:
                    continue
                self.seen.add((r.device, r.seq))
                self.tiers[r.tier] += 1
                self.arrival.append(t)
                self.latency.append(r.latency_ms)
                if r.label is not None:
                    self.labelled += 1
                    self.correct += int(r.cls == r.label)
        return len(payloads)


def _wait_quiet(take: Callable[[], int], done: Callable[[], bool], timeout: float) -> None:
    """Call `take()` (returns messages taken) until `done()`, nothing came for QUIET_S, or `timeout`."""
    deadline = last = time.monotonic()
    deadline += timeout
    while time.monotonic() < deadline:
        if take():
            last = time.monotonic()
        if done() or time.monotonic() - last > QUIET_S:
            return
        time.sleep(POLL_S)


def _roles(pool, sinks: dict[int, str]) -> dict[int, str]:
    """Process groups known by pid: this driver, the publisher processes, the sinks."""
    return {os.getpid(): "driver", **dict.fromkeys(pool.pids, "publishers"), **sinks}


def _edge_counts(edge) -> collections.Counter:
    import ray

    total: collections.Counter = collections.Counter()
    for stats in ray.get([h.stats.remote() for h in edge.handles], timeout=60):
        total.update({k: v for k, v in stats.items() if isinstance(v, (int, float)) and k != "queue_depth"})
    return total


def run_tier_phase(name, offered, seconds, pool, sink, edge, exclude, cfg) -> Phase:
    """One phase of `edgeq` or `cloud-only`: publish, collect every answer, read the edge's counters."""
    from infra.bench.loadgen import ProcessTree

    before = _edge_counts(edge)
    tree = ProcessTree(exclude, roles=_roles(pool, {sink.pid: "results sink"})).start()
    t0 = time.time_ns()
    rep = pool.run(f"ph{next(_PHASE_IDS)}-d", offered, seconds, cfg.warmup_s)
    answers = _Answers()
    dropped = [0]

    def done() -> bool:
        c = _edge_counts(edge) - before
        dropped[0] = sum(v for k, v in c.items() if k.startswith(("dropped.", "rejected.")))
        return len(answers.seen) + dropped[0] >= rep.acked

    _wait_quiet(lambda: answers.add(*sink.take()), done, cfg.drain_timeout_s)
    cpu, rss = tree.stop()
    counts = _edge_counts(edge) - before
    arrival = np.asarray(answers.arrival, dtype=np.int64)
    latency = np.asarray(answers.latency, dtype=np.float64)
    # Capture time of an answer: its arrival minus the latency the worker stamped (exact up to the result's
    # own trip through the broker), used only to pick the frames of the steady window.
    rate, lat = _steady(arrival, arrival - (latency * 1e6).astype(np.int64), latency, t0, cfg, seconds)
    return Phase(name, offered, rep.seconds, rep.acked, rep.bytes_sent, len(answers.seen),
                 answers.result_count - len(answers.seen), dropped[0], rate, lat, cpu, rss,
                 counts.get("bytes_edge_to_cloud", 0), answers.bytes, answers.labelled, answers.correct, answers.tiers,
                 _captured_rate(rep, cfg, seconds), tree.cpu_by_group)


def run_ceiling_phase(name, offered, seconds, pool, sinks, exclude, cfg) -> Phase:
    """One phase of the ceiling: publish, count what the plain subscribers received."""
    from infra.bench.loadgen import ProcessTree

    tree = ProcessTree(exclude, roles=_roles(pool, {s.pid: "ceiling subscribers" for s in sinks})).start()
    t0 = time.time_ns()
    rep = pool.run(f"ph{next(_PHASE_IDS)}-d", offered, seconds, cfg.warmup_s)
    arrivals, captures, nbytes = [], [], [0]

    def take() -> int:
        n = 0
        for s in sinks:
            a, c, b = s.take()
            arrivals.append(a)
            captures.append(np.asarray(c, dtype=np.int64))
            nbytes[0] += b
            n += len(a)
        return n

    received = lambda: sum(len(a) for a in arrivals)  # noqa: E731
    _wait_quiet(take, lambda: received() >= rep.acked, cfg.drain_timeout_s)
    cpu, rss = tree.stop()
    arrival, capture = np.concatenate(arrivals), np.concatenate(captures)
    rate, lat = _steady(arrival, capture, (arrival - capture) / 1e6, t0, cfg, seconds)
    return Phase(name, offered, rep.seconds, rep.acked, rep.bytes_sent, len(arrival), 0, 0, rate, lat, cpu, rss,
                 0, nbytes[0], captured_rate=_captured_rate(rep, cfg, seconds), cpu_groups=tree.cpu_by_group)
