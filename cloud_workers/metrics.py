"""Prometheus metrics of the cloud tier (one set per cloud worker process)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# Same buckets as the edge tier (not imported from edge_workers.metrics: that would
# register the edge metrics in cloud processes too).
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

CLOUD_FRAMES = Counter("edgeq_cloud_frames_total", "Frames classified by cloud workers, by uplink codec.", ["codec"])
CLOUD_BYTES = Counter(
    "edgeq_cloud_received_bytes_total", "Uplink codec payload bytes received by cloud workers.", ["codec"]
)
CLOUD_ERRORS = Counter("edgeq_cloud_errors_total", "Cloud requests rejected, by reason.", ["reason"])
CLOUD_BATCH = Histogram("edgeq_cloud_batch_size", "Frames per cloud request.", buckets=BATCH_BUCKETS)
CLOUD_INFERENCE_SECONDS = Histogram(
    "edgeq_cloud_inference_seconds", "Cloud model inference time per request, by model.", ["model"],
    buckets=LATENCY_BUCKETS,
)
