"""The offload controller in the edge worker: measures the worker's own traffic each control period, ticks, applies.

With ``edge.uplink_budget_kbps`` or ``edge.p99_budget_ms`` set (policy ``confidence``), an edge actor owns one
``OffloadLoop``. Its processing thread calls:

- ``maybe_tick()`` once per pass of its loop; every ``edge.control_period_s`` it builds a ``Measurement``
  from the window since the previous tick: uplink bytes/s to the cloud (the worker's ``bytes_edge_to_cloud``
  counter, read through a callable), the p99 of the latency of the frames it answered (``on_answers``), the
  consecutive failed or timed-out cloud calls (``on_call_failed``, reset by ``on_call_done``), and the link
  estimate. It ticks the ``OffloadController`` and applies the ``Decision`` through ``set_threshold``: the
  decision's threshold in mode offload, 0 (nothing offloaded: confidence is never below 0) in edge-only;
- ``on_call_done(nbytes, sent_s, done_s)`` for each finished cloud call, which also feeds the
  ``LinkEstimator`` (the cloud reports no service time, so it counts as link time: the bandwidth estimate is
  a lower bound).

While edge-only nothing else reaches the cloud, so each tick starts a probe (``probe``: a callable returning
``poll() -> True | False | None`` for ok, failed, pending) and the next tick counts its outcome. Every tick is
recorded with ``SplitMetrics`` (threshold, mode, choice, predicted latency, utilisation, link, reason).

Clock-injected (``clock``, monotonic seconds) and free of Ray and MQTT, so it is tested with synthetic counters.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import numpy as np

from edge_workers.link_estimator import LinkEstimator, Transfer
from edge_workers.offload_controller import (
    EDGE_ONLY,
    OFFLOAD,
    ControllerConfig,
    Decision,
    Measurement,
    OffloadController,
)
from edge_workers.split_metrics import SplitMetrics
from edge_workers.split_planner import Option
from modelstore.profiles import KNOWN_LINKS

logger = logging.getLogger(__name__)

MAX_WINDOW_LATENCIES = 100_000  # answered frames kept per window for the p99 (older ones dropped)
PRIOR_LINK = "ethernet"  # planning figures until the cloud calls measure the hop


class OffloadLoop:
    """One edge actor's control loop; see the module docstring. uplink_bytes: total bytes sent to the cloud so far;
    set_threshold: applies a confidence threshold to the routing; probe: starts a cloud probe (edge-only mode)."""

    def __init__(self, controller: OffloadController, period_s: float, uplink_bytes: Callable[[], int],
                 set_threshold: Callable[[float], None], estimator: LinkEstimator | None = None,
                 split_metrics: SplitMetrics | None = None,
                 probe: Callable[[], Callable[[], bool | None]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if not period_s > 0:
            raise ValueError(f"control period must be > 0 s, got {period_s!r}")
        self.controller, self.period_s, self.clock = controller, period_s, clock
        self._uplink_bytes, self._set_threshold, self._probe_start = uplink_bytes, set_threshold, probe
        self.estimator = estimator or LinkEstimator(KNOWN_LINKS[PRIOR_LINK])
        self.metrics = split_metrics
        self.failures = 0
        self.ticks = 0
        self._latencies_ms: collections.deque[float] = collections.deque(maxlen=MAX_WINDOW_LATENCIES)
        self._probe: Callable[[], bool | None] | None = None
        self._t0 = clock()
        self._bytes0 = uplink_bytes()
        self._next = self._t0 + period_s
        self.decision = controller.decision
        self._apply(self.decision)

    @classmethod
    def for_worker(cls, worker) -> OffloadLoop | NullLoop:
        """The loop of edge actor `worker` (edge_workers.worker.EdgeWorker), or a NullLoop when no budget is set or
        the policy is not confidence (nothing to adjust)."""
        cfg = worker.cfg
        if cfg.policy != "confidence" or (cfg.uplink_budget_kbps is None and cfg.p99_budget_ms is None):
            return NullLoop()
        ccfg = ControllerConfig(uplink_budget_kbps=cfg.uplink_budget_kbps, p99_budget_ms=cfg.p99_budget_ms,
                                threshold_max=cfg.threshold, min_period_s=cfg.control_dwell_s,
                                reprobe_after_s=max(60.0, 12 * cfg.control_dwell_s))
        tensors = worker.tensors
        option = None
        if tensors is not None and tensors.head is not None:  # the configured edge -> cloud split
            head = tensors.head
            option = Option(head.cut_id, head.codec, 0.0, 0.0, head.frame_bytes("dev0"))
        controller = OffloadController(ccfg, (), option)
        if tensors is not None:  # TensorPath recorded the initial choice already
            metrics = tensors.split_metrics
        else:
            metrics = SplitMetrics("edge_to_cloud")
            metrics.record(Decision(OFFLOAD, cfg.threshold, option, "initial", changed=True))

        def set_threshold(theta: float) -> None:
            worker.processor.threshold = theta

        return cls(controller, cfg.control_period_s,
                   lambda: worker.counts["bytes_edge_to_cloud"], set_threshold, split_metrics=metrics,
                   probe=lambda: ray_probe(worker))

    # ------------------------------------------------------------ events from the worker

    def on_answers(self, latencies_ms) -> None:
        """End-to-end latencies (ms) of frames this worker answered (or a cloud actor answered for it)."""
        self._latencies_ms.extend(float(x) for x in latencies_ms)

    def on_call_done(self, nbytes: int, sent_s: float, done_s: float) -> None:
        """A cloud call that succeeded: `nbytes` sent at monotonic `sent_s`, finished at `done_s`."""
        self.failures = 0
        if done_s >= sent_s:
            self.estimator.add(Transfer(int(nbytes), sent_s, done_s))

    def on_call_failed(self) -> None:
        """A cloud call that failed, timed out, or could not be sent."""
        self.failures += 1

    @property
    def edge_only(self) -> bool:
        return self.decision.mode == EDGE_ONLY

    # ------------------------------------------------------------ the tick

    def maybe_tick(self) -> Decision | None:
        """Tick once the control period has passed since the previous tick; returns the decision applied, or None."""
        now = self.clock()
        if now < self._next:
            return None
        return self.tick(now)

    def tick(self, now: float) -> Decision:
        self._poll_probe()
        dt = max(now - self._t0, 1e-9)
        total = self._uplink_bytes()
        uplink = (total - self._bytes0) / dt
        p99 = (float(np.percentile(np.fromiter(self._latencies_ms, dtype=np.float64), 99))
               if self._latencies_ms else None)
        link = self.estimator.estimate(now)
        m = Measurement(now, uplink, p99, self.failures, link.profile)
        decision = self.controller.tick(m)
        self._t0, self._bytes0, self._next = now, total, now + self.period_s
        self._latencies_ms.clear()
        self.ticks += 1
        if decision.changed:
            logger.info("offload: %s -> mode %s threshold %.3f (uplink %.0f B/s, p99 %s ms)", decision.reason,
                        decision.mode, decision.threshold, uplink, "-" if p99 is None else f"{p99:.1f}")
            self._apply(decision)
        self.decision = decision
        if self.metrics is not None:
            self.metrics.record(decision, self.controller.utilisation(m), link)
        if decision.mode == EDGE_ONLY and self._probe is None and self._probe_start is not None:
            self._probe = self._probe_start()
        return decision

    def _apply(self, decision: Decision) -> None:
        self._set_threshold(0.0 if decision.mode == EDGE_ONLY else decision.threshold)

    def _poll_probe(self) -> None:
        if self._probe is None:
            return
        outcome = self._probe()
        if outcome is None:
            return
        self._probe = None
        if outcome:
            self.failures = 0
        else:
            self.failures += 1


class NullLoop:
    """No budget set: the worker's calls cost nothing and change nothing."""

    edge_only = False

    def on_answers(self, latencies_ms) -> None:
        pass

    def on_call_done(self, nbytes: int, sent_s: float, done_s: float) -> None:
        pass

    def on_call_failed(self) -> None:
        pass

    def maybe_tick(self) -> None:
        return None


def ray_probe(worker, timeout_s: float | None = None) -> Callable[[], bool | None]:
    """Start a probe of the worker's next cloud actor (its `info()`); returns poll() -> True ok, False failed or past
    the cloud timeout, None pending."""
    import ray

    if not worker._clouds:
        return lambda: False
    index = worker._next_cloud % len(worker._clouds)
    worker._next_cloud += 1
    try:
        ref = worker._clouds[index].info.remote()
    except Exception:  # noqa: BLE001 - a dead handle is a failed probe
        return lambda: False
    deadline = time.monotonic() + (timeout_s or worker.cfg.cloud_timeout_s)

    def poll() -> bool | None:
        done, _ = ray.wait([ref], timeout=0)
        if not done:
            if time.monotonic() < deadline:
                return None
            ray.cancel(ref)
            return False
        try:
            ray.get(ref)
            return True
        except Exception:  # noqa: BLE001 - a failing actor
            return False

    return poll
