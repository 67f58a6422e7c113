"""Configuration of the edge tier (config section `edge`, env EDGEQ_EDGE__*)."""

from __future__ import annotations

from dataclasses import dataclass

from publishers.errors import ConfigError

POLICIES = ("confidence", "edge-only", "cloud-only")
CODECS = ("raw", "denoised", "pca-f16", "pca-int8")


@dataclass
class EdgeConfig:
    """How edge workers take frames, preprocess them, classify and route them.

    Model files are looked up in `models_dir` (default: the repository's models/).
    """

    actors: int = 2                   # edge worker actors (each with its own MQTT client)
    group: str = "edgeq-edge"         # shared-subscription group the actors join
    queue_size: int = 10_000          # bounded ingest queue per actor (messages)
    batch_max: int = 64               # micro-batch: at most this many frames ...
    # ... or this long after the first one arrives (0 = take what is queued: batches still grow under load, as
    # frames queue while a batch runs). Under moderate load a short wait pays: each batch has a fixed cost
    # (model and filter calls, one send, one Ray call) that 1-2-frame batches pay per frame. edgeq alone at
    # 1,500 frames/s on 2 cores (issue 7, alternating runs): p99 61.8 / 44.7 ms with 0, 24.2 / 29.6 ms with 2,
    # p50 6.8-6.9 vs 5.4-6.2 ms, edge CPU per frame 539-554 vs 485-490 us.
    batch_wait_ms: float = 2.0
    # The Q-CNN of the edge CNN (16x smaller file, docs/results/qcnn.md) by default; runtime "onnx" with
    # model "edge_cnn.onnx" runs the float model (or an int8 QDQ file) instead.
    runtime: str = "qcnn"             # model runtime key: onnx (float/int8 files) or qcnn
    model: str = "edge_cnn.qcnn.onnx" # edge classifier, relative to models_dir
    models_dir: str = ""              # "" = the repository's models/
    threads: int = 1                  # inference threads per actor
    # Both chosen on the train split's validation slice by scripts/select_preprocessing.py
    # (docs/results/preprocessing.md): denoise by edge CNN accuracy on denoised frames, unchanged;
    # pca_components = bytes per pca-int8 frame, was 48.
    denoise: str = "auto"             # noise reduction: see edge_workers.denoise
    pca_components: int = 64          # PCA coefficients for the pca-* codecs (must match the cloud PCA model)
    policy: str = "confidence"        # confidence | edge-only | cloud-only
    threshold: float = 0.9            # confidence (1 - normalised entropy) needed to answer at the edge
    # What goes up to the cloud: raw | denoised | pca-f16 | pca-int8. `denoised` feeds the cloud CNN, which
    # is right more often than the edge on the uncertain frames (docs/pipeline.md has the measurement);
    # pca-int8 moves 12x fewer bytes per forwarded frame to a model no better than the edge's.
    codec: str = "denoised"
    cloud_timeout_s: float = 2.0      # per cloud call; on timeout the edge answers, marked degraded
    metrics_port: int = 9601          # actor i serves metrics on metrics_port + i; 0 = any free port
    metrics_addr: str = "127.0.0.1"   # bind address of the metrics endpoints
    # Also take labelled frames from the train/eval topics, reduce them with `codec` and send them to the cloud
    # workers' learning store (edge_workers.learning, docs/edge-learning.md).
    learn: bool = False
    # Device/edge split (docs/partition.md): a partition manifest (`<model>.partition.json`) or the directory
    # holding one, relative to models_dir. Set: the actors also take the devices' head tensor frames
    # (edgeq/v1/tensors/+, shared subscription), check them against the manifest's cuts, send them to the cloud
    # tails and run the tails themselves when the cloud fails (answers degraded) or under policy edge-only.
    # "" = off: pixel frames only.
    partitions: str = ""
    # Edge/cloud split (needs partitions, codec raw or denoised): a cut of that manifest (point or id). Frames the
    # edge forwards go up as the head's tensor frames (codec uplink_tensor_codec) and the cloud runs the tail.
    uplink_cut: str = ""
    uplink_tensor_codec: str = "int8"
    # Adaptive offload (docs/partition.md, the controller in the worker): under policy confidence, an
    # OffloadController lowers the threshold (fewer frames to the cloud) while the uplink to the cloud (kbit/s,
    # 1 kbit = 1000 bit) or the p99 of this actor's answers (ms) is over budget, raises it back toward `threshold`
    # when underused, and answers at the edge only after consecutive cloud failures. Both None: off.
    uplink_budget_kbps: float | None = None
    p99_budget_ms: float | None = None
    control_period_s: float = 1.0     # one control tick (and measurement window) per this many seconds
    control_dwell_s: float = 5.0      # no two threshold changes closer than this (ControllerConfig.min_period_s)

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ConfigError(f"edge.actors must be >= 1, got {self.actors}")
        if self.policy not in POLICIES:
            raise ConfigError(f"edge.policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        from edge_workers.denoise import METHODS

        if self.denoise not in METHODS:
            raise ConfigError(f"edge.denoise must be one of {', '.join(METHODS)}, got {self.denoise!r}")
        if self.codec not in CODECS:
            raise ConfigError(f"edge.codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"edge.threshold must be in [0, 1], got {self.threshold}")
        if self.batch_max < 1 or self.batch_wait_ms < 0 or self.queue_size < 1:
            raise ConfigError(
                f"edge.batch_max >= 1, batch_wait_ms >= 0 and queue_size >= 1 required, got "
                f"{self.batch_max}, {self.batch_wait_ms}, {self.queue_size}"
            )
        if self.cloud_timeout_s <= 0:
            raise ConfigError(f"edge.cloud_timeout_s must be > 0, got {self.cloud_timeout_s}")
        if self.pca_components < 1:
            raise ConfigError(f"edge.pca_components must be >= 1, got {self.pca_components}")
        if self.uplink_cut and (not self.partitions or self.codec not in ("raw", "denoised")):
            raise ConfigError(f"edge.uplink_cut needs edge.partitions and edge.codec raw or denoised, got "
                              f"partitions={self.partitions!r}, codec={self.codec!r}")
        for name in ("uplink_budget_kbps", "p99_budget_ms"):
            v = getattr(self, name)
            if v is not None and not 0 < v < float("inf"):
                raise ConfigError(f"edge.{name} must be > 0 (or unset), got {v}")
        if not 0 < self.control_period_s <= self.control_dwell_s or self.control_dwell_s == float("inf"):
            raise ConfigError(f"need 0 < edge.control_period_s <= edge.control_dwell_s (finite), got "
                              f"{self.control_period_s}, {self.control_dwell_s}")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"edge.metrics_port must be a port number, got {self.metrics_port}")
