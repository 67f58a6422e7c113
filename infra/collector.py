"""Collecting result messages off the broker: unique answers, duplicates, tiers, accuracy, latency.

Used by `edgeq demo`, the benchmarks and the end-to-end tests, as a user's
application would consume results: a plain MQTT subscriber on
edgeq/v1/results/+. One message holds one or several results of one device
(`results.decode_all`); counters below say whether they count messages or results.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from edge_workers.ingest import Subscriber
from publishers import results, topics
from publishers.mqtt import MqttConfig


@dataclass
class ResultStats:
    """Everything counted from result messages; `unique` is keyed by (device, seq).

    messages, bad_messages, bytes: MQTT messages received, those that were not a valid result message (counted
    once however many results they held), and their payload bytes. result_count: results in the valid messages
    (duplicates included). The other counters count unique results (the first answer of a frame).
    """

    messages: int = 0
    bad_messages: int = 0
    bytes: int = 0
    result_count: int = 0
    unique: dict[tuple[str, int], results.Result] = field(default_factory=dict)
    tiers: collections.Counter = field(default_factory=collections.Counter)
    degraded: int = 0
    labelled: int = 0
    correct: int = 0
    correct_by_tier: collections.Counter = field(default_factory=collections.Counter)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        """Results for a frame that was already answered (a redelivered frame answered twice)."""
        return self.result_count - len(self.unique)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def tier_accuracy(self, tier: str) -> float | None:
        n = sum(1 for r in self.unique.values() if r.tier == tier and r.label is not None)
        return self.correct_by_tier[tier] / n if n else None

    def latency_percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def add(self, payload: bytes) -> None:
        """Count one MQTT message of the results topic (one result or a batch of one device's results)."""
        self.messages += 1
        self.bytes += len(payload)
        try:
            rs = results.decode_all(payload)
        except results.ResultDecodeError:
            self.bad_messages += 1
            return
        self.result_count += len(rs)
        for r in rs:
            key = (r.device, r.seq)
            if key in self.unique:
                continue  # a redelivered frame answered twice: counted in `duplicates`
            self.unique[key] = r
            self.tiers[r.tier] += 1
            self.degraded += r.degraded
            self.latencies_ms.append(r.latency_ms)
            if r.label is not None:
                self.labelled += 1
                if r.cls == r.label:
                    self.correct += 1
                    self.correct_by_tier[r.tier] += 1


class ResultCollector:
    """Subscribes to every device's results and counts them in a background thread."""

    def __init__(self, mqtt_cfg: MqttConfig, client_id: str = "edgeq-results-collector"):
        """A persistent session, so results published while the broker restarts reach it; the id gets
        this process's pid and a timestamp, so it never resumes an earlier run's session."""
        self.stats = ResultStats()
        unique_id = f"{client_id}-{os.getpid()}-{time.time_ns() % 10**9}"
        self.sub = Subscriber(mqtt_cfg, unique_id, topics.RESULTS_FILTER, max_queue=1_000_000, persistent=True)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="results", daemon=True)

    def start(self) -> ResultCollector:
        self.sub.start()
        self.sub.wait_subscribed()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not (self._stop.is_set() and self.sub.queue.empty()):
            batch = self.sub.get_batch(1024, 0.05)
            with self._lock:
                for msg in batch:
                    self.stats.add(msg.payload)

    def answered(self) -> int:
        with self._lock:
            return len(self.stats.unique)

    def wait_for(self, n: int, timeout: float) -> bool:
        """Wait until `n` unique answers arrived (bounded by `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while self.answered() < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> ResultStats:
        self.sub.unsubscribe(timeout=2.0)  # the broker keeps the session, but queues nothing more for it
        self._stop.set()
        self._thread.join(timeout=10)
        self.sub.stop()
        return self.stats
