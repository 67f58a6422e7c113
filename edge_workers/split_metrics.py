"""Prometheus metrics of split computing and the offload controller (``edgeq_split_*``), one set per edge process.

Declared apart from ``edge_workers/metrics.py`` and registered in the same default registry, so a
worker that imports this module serves both on its one endpoint. Labels are bounded: ``hop`` is
one of HOPS, ``cut`` a cut id of the served partition (a manifest has at most a few tens) or
``input``/``output``/``default`` (no split chosen: the worker's uplink codec), ``codec`` a tensor or
uplink codec, ``reason`` one of ``offload_controller.REASONS``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from edge_workers.link_estimator import LinkEstimate
from edge_workers.offload_controller import EDGE_ONLY, OFFLOAD, REASONS, Decision

HOPS = ("device_to_edge", "edge_to_cloud")
MODES = (OFFLOAD, EDGE_ONLY)
DEFAULT_CUT = "default"
# Seconds: a millisecond to the slow emulated links' answers.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

CHOICE = Gauge("edgeq_split_choice", "1 for the split applied now by hop, cut and codec; 0 for those applied before.",
               ["hop", "cut", "codec"])
MODE = Gauge("edgeq_split_mode", "1 for the controller's current mode (offload, edge-only), else 0.", ["hop", "mode"])
THRESHOLD = Gauge("edgeq_split_threshold", "Confidence threshold applied: frames with confidence below it are "
                  "offloaded.", ["hop"])
PREDICTED = Gauge("edgeq_split_predicted_latency_seconds", "Planner's expected latency of an offloaded frame "
                  "under the current split and link estimate.", ["hop"])
MEASURED = Histogram("edgeq_split_measured_latency_seconds", "Measured latency of offloaded frames, from the "
                     "lower tier sending to the answer, by hop.", ["hop"], buckets=LATENCY_BUCKETS)
UTILISATION = Gauge("edgeq_split_budget_utilisation_ratio", "max(uplink / uplink budget, p99 / p99 budget) at the "
                    "last control tick; above 1 is over budget.", ["hop"])
DECISIONS = Counter("edgeq_split_decisions_total", "Control ticks by reason and whether the decision changed.",
                    ["hop", "reason", "changed"])
LINK_BANDWIDTH = Gauge("edgeq_split_link_bandwidth_bytes_per_second", "Link bandwidth the planner uses "
                       "(measured, pinned by config or prior).", ["hop"])
LINK_RTT = Gauge("edgeq_split_link_rtt_seconds", "Link round-trip time the planner uses.", ["hop"])


class SplitMetrics:
    """Writes one hop's controller decisions, link estimates and measured latencies to the metrics above."""

    def __init__(self, hop: str = "edge_to_cloud"):
        if hop not in HOPS:
            raise ValueError(f"unknown hop {hop!r}; known: {', '.join(HOPS)}")
        self.hop = hop
        self._choice: tuple[str, str] | None = None

    def record(self, decision: Decision, utilisation: float | None = None,
               link: LinkEstimate | None = None) -> None:
        """One control tick: its decision (and the budget utilisation and link estimate it was taken with)."""
        if decision.reason not in REASONS:
            raise ValueError(f"unknown decision reason {decision.reason!r}")
        hop = self.hop
        DECISIONS.labels(hop, decision.reason, "true" if decision.changed else "false").inc()
        opt = decision.option
        choice = (opt.cut, opt.codec or "none") if opt is not None else (DEFAULT_CUT, "none")
        if choice != self._choice:
            if self._choice is not None:
                CHOICE.labels(hop, *self._choice).set(0)
            CHOICE.labels(hop, *choice).set(1)
            self._choice = choice
        for mode in MODES:
            MODE.labels(hop, mode).set(1 if decision.mode == mode else 0)
        THRESHOLD.labels(hop).set(decision.threshold)
        if decision.predicted_ms is not None:
            PREDICTED.labels(hop).set(decision.predicted_ms / 1e3)
        if utilisation is not None:
            UTILISATION.labels(hop).set(utilisation)
        if link is not None:
            LINK_BANDWIDTH.labels(hop).set(link.profile.bandwidth_bps / 8.0)
            LINK_RTT.labels(hop).set(link.profile.rtt_ms / 1e3)

    def observe_latency(self, seconds: float) -> None:
        """One offloaded frame's measured latency, seconds."""
        MEASURED.labels(self.hop).observe(seconds)
