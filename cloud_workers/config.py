"""Configuration of the cloud tier (config section `cloud`, env EDGEQ_CLOUD__*)."""

from __future__ import annotations

from dataclasses import dataclass

from publishers.errors import ConfigError

RUNTIMES = ("onnx", "qcnn")  # model runtime keys the cloud's frame model can use (edge_workers.runtime)
DEFAULT_FRAME_MODEL, QCNN_FRAME_MODEL = "cloud_cnn.onnx", "cloud_cnn.qcnn.onnx"


@dataclass
class CloudConfig:
    """The cloud worker pool: one model per uplink codec family, loaded in every actor."""

    actors: int = 1                          # cloud worker actors
    # The frame model's runtime: onnx (float or int8 files) or qcnn (a Q-CNN file: with the default frame_model
    # that is cloud_cnn.qcnn.onnx, 28.6x smaller and 2-2.8x faster than the float file, docs/results/qcnn.md).
    runtime: str = "onnx"
    frame_model: str = "cloud_cnn.onnx"      # for the raw and denoised codecs (input [N,1,28,28])
    pca_model: str = "cloud_pca_mlp.onnx"    # for the pca-f16 and pca-int8 codecs (input [N,k])
    models_dir: str = ""                     # "" = the repository's models/
    threads: int = 1                         # inference threads per actor
    metrics_port: int = 9701                 # actor i serves metrics on metrics_port + i; 0 = any free port
    metrics_addr: str = "127.0.0.1"
    # k the pca-* codecs take; 0 = the PCA MLP model's input size. With another k (<= pca.npz's k_max) pca
    # frames are answered once a model was learned for that k (cloud_workers.learning), degraded before.
    pca_components: int = 0
    # Device/edge split: a partition manifest (or the directory holding one), relative to models_dir, whose tails
    # answer the tensor frames edge workers forward (cloud_workers.tail.TailMixin). "" = none.
    partitions: str = ""

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ConfigError(f"cloud.actors must be >= 1, got {self.actors}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"cloud.runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.runtime == "qcnn" and self.frame_model == DEFAULT_FRAME_MODEL:
            self.frame_model = QCNN_FRAME_MODEL
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"cloud.metrics_port must be a port number, got {self.metrics_port}")
        if self.pca_components < 0:
            raise ConfigError(f"cloud.pca_components must be >= 0, got {self.pca_components}")


@dataclass
class RayConfig:
    """Where the actors run (config section `ray`)."""

    address: str = ""          # "" = start a local Ray; else e.g. "auto" or "10.0.0.5:6379"
    namespace: str = "edgeq"   # named actors (edgeq-cloud-0, ...) live here
    num_cpus: int = 0          # local Ray only; 0 = all cores
