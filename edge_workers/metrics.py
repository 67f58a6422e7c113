"""Prometheus metrics of the edge tier (one set per edge worker process).

Label values are bounded: reasons, tiers, directions and model keys, never a
device id. Every edge worker serves these on its own HTTP port (see
``infra/prometheus/prometheus.yml`` and docs/metrics.md).
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram


@functools.cache
def child(metric, *values: str):  # -> the labelled child of `metric`
    """`metric.labels(*values)`, memoised: a labels() call takes a lock and validates its arguments (about
    5 us); the edge's hot path made ~10 per batch (issue 7). Label values are bounded (see above)."""
    return metric.labels(*values)

# Latency buckets in seconds: sub-millisecond to a few seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

FRAMES_RECEIVED = Counter(
    "edgeq_frames_received_total", "Frames taken off MQTT by edge workers (before decoding)."
)
RESULTS = Counter(
    "edgeq_results_total",
    "Results published, by the tier that answered and whether the answer is degraded "
    "(edge fallback after a cloud failure).",
    ["tier", "degraded"],
)
PAYLOAD_BYTES = Counter(
    "edgeq_payload_bytes_total",
    "Payload bytes moved per hop: device_to_edge (MQTT frame payloads), edge_to_cloud (uplink codec "
    "payloads), edge_to_device (result messages).",
    ["direction"],
)
DECODE_ERRORS = Counter("edgeq_decode_errors_total", "Frames rejected at the edge, by reason.", ["reason"])
DROPS = Counter("edgeq_dropped_frames_total", "Frames dropped at the edge, by reason.", ["reason"])
QUEUE_DEPTH = Gauge("edgeq_queue_depth", "Messages waiting in the edge ingest queue.")
BATCH_SIZE = Histogram("edgeq_batch_size", "Frames per processed micro-batch.", buckets=BATCH_BUCKETS)
INFERENCE_SECONDS = Histogram(
    "edgeq_inference_seconds", "Model inference time per batch, by model.", ["model"], buckets=LATENCY_BUCKETS
)
STAGE_SECONDS = Histogram(
    "edgeq_stage_seconds", "Edge time per batch, by stage: queue_wait (first frame's arrival to batch start), "
    "decode, denoise, encode.", ["stage"], buckets=LATENCY_BUCKETS
)
E2E_LATENCY = Histogram(
    "edgeq_end_to_end_latency_seconds",
    "Capture timestamp to result published, by answering tier.",
    ["tier"],
    buckets=LATENCY_BUCKETS,
)
PREDICTIONS = Counter(
    "edgeq_predictions_total",
    "Answers to labelled frames, by tier and outcome (correct|wrong): online accuracy.",
    ["tier", "outcome"],
)
CLOUD_REQUESTS = Counter(
    "edgeq_cloud_requests_total", "Edge-to-cloud batch calls by outcome (ok|timeout|error).", ["outcome"]
)
