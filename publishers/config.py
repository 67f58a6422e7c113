"""Configuration of simulated and real devices (the `publish` section)."""

from __future__ import annotations

from dataclasses import dataclass

from publishers import tensor_codec
from publishers.errors import ConfigError
from publishers.noise import NOISE_KINDS

SOURCES = ("mnist", "directory", "camera")
DROP_POLICIES = ("block", "drop-oldest", "drop-newest")
TOPIC_KINDS = ("frames", "train", "eval")  # publishers.topics.FRAME_KINDS but "tensors" (chosen by `head`)


@dataclass
class PublishConfig:
    """What the devices send and how fast.

    devices: number of simulated devices, each its own MQTT client and thread.
    rate_hz: frames per second per device; 0 = as fast as the broker takes them.
    count: frames per device (0 = until `duration_s` or the source ends).
    duration_s: stop after this many seconds (0 = no time limit).
    source: `mnist` (replay a dataset split), `directory` (.npy/.pgm/.png/.jpg files)
        or `camera` (Raspberry Pi camera, needs the `pi` extra).
    noise/noise_level: simulated sensor noise (publishers.noise).
    topic: `frames` (to be answered), `train` (labelled frames for the cloud to learn
        from) or `eval` (labelled held-out frames it scores its models on).
    queue_size: frames a device buffers while the broker is slow or away.
    drop_policy: what a full buffer does: `block` pauses the source (no loss),
        `drop-oldest` or `drop-newest` discard and count.
    resend_after_s: end-to-end at-least-once (docs/reliability.md): > 0 makes each
        device subscribe to its results and publish a frame again (same seq) when no
        result came within this many seconds; at most `queue_size` frames wait for a
        result. 0 (default) = fire and forget once the broker confirmed the frame.
    head: split computing (docs/partition.md, "Device/edge split"): a partition's head file
        (`<cut id>.head.onnx`, its `<model>.partition.json` beside it) or a manifest with
        `cut`; each frame goes through the head (onnxruntime) and its tensor is published as
        a tensor frame on edgeq/v1/tensors/<device_id> instead of the pixels. None = pixels.
    cut: with a manifest as `head`: the cut point ("pool2") or id ("edge_cnn@pool2").
    tensor_codec: how the head's tensor is encoded (publishers.tensor_codec: float32,
        float16, int8, int8-channel, pq8); it must be offered at the cut.
    """

    devices: int = 4
    rate_hz: float = 50.0
    count: int = 250
    duration_s: float = 0.0
    source: str = "mnist"
    split: str = "test"
    data_dir: str | None = None
    directory: str | None = None
    frame_shape: str = "28x28"
    noise: str = "none"
    noise_level: float = 0.2
    queue_size: int = 1000
    drop_policy: str = "block"
    resend_after_s: float = 0.0
    device_prefix: str = "dev"
    seed: int = 0
    progress_s: float = 1.0
    topic: str = "frames"
    # mnist: replay in a random order seeded by `seed` (the bundled train split is sorted by class)
    shuffle: bool = False
    head: str | None = None
    cut: str | None = None
    tensor_codec: str = "int8"

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError(f"publish.devices must be >= 1, got {self.devices}")
        if self.rate_hz < 0 or self.count < 0 or self.duration_s < 0:
            raise ConfigError("publish.rate_hz, count and duration_s must be >= 0")
        if self.source not in SOURCES:
            raise ConfigError(f"publish.source must be one of {SOURCES}, got {self.source!r}")
        if self.noise not in NOISE_KINDS:
            raise ConfigError(f"publish.noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if not 0 <= self.noise_level <= 1:
            raise ConfigError(f"publish.noise_level must be in [0, 1], got {self.noise_level}")
        if self.resend_after_s < 0:
            raise ConfigError(f"publish.resend_after_s must be >= 0, got {self.resend_after_s}")
        if self.queue_size < 1:
            raise ConfigError(f"publish.queue_size must be >= 1, got {self.queue_size}")
        if self.drop_policy not in DROP_POLICIES:
            raise ConfigError(f"publish.drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")
        if self.topic not in TOPIC_KINDS:
            raise ConfigError(f"publish.topic must be one of {TOPIC_KINDS}, got {self.topic!r}")
        if self.tensor_codec not in tensor_codec.CODECS:
            raise ConfigError(f"publish.tensor_codec must be one of {tensor_codec.CODECS}, got {self.tensor_codec!r}")
        if self.cut and not self.head:
            raise ConfigError(f"publish.cut {self.cut!r} names a cut of a partition: it needs publish.head")
        if self.head and self.topic != "frames":
            raise ConfigError(f"publish.head sends tensor frames to be answered (edgeq/v1/tensors/<device>); "
                              f"publish.topic must be frames, got {self.topic!r}")
        self.shape()  # validates frame_shape

    def shape(self) -> tuple[int, int]:
        """frame_shape "HxW" as (H, W)."""
        try:
            h, w = (int(x) for x in self.frame_shape.lower().split("x"))
        except ValueError as err:
            raise ConfigError(f"publish.frame_shape must look like 28x28, got {self.frame_shape!r}") from err
        if h < 1 or w < 1:
            raise ConfigError(f"publish.frame_shape must be positive, got {self.frame_shape!r}")
        return h, w
