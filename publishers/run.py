"""Running N devices in threads, with progress lines and a final report (`edgeq publish`, `--head` too)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from publishers import topics
from publishers.config import PublishConfig
from publishers.device import Device, DeviceStats
from publishers.errors import ConfigError
from publishers.mqtt import MqttConfig
from publishers.sources import load_replay_data, make_source

if TYPE_CHECKING:
    from publishers.head import HeadRunner

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class PublishReport:
    """What a publishing run did, summed over its devices. `head`: the devices' partition head (tensor
    frames on edgeq/v1/tensors/<device>), None when they sent pixel frames."""

    devices: list[DeviceStats]
    seconds: float
    head: HeadRunner | None = None

    @property
    def bytes_per_frame(self) -> float:
        """Mean MQTT payload bytes per frame sent (wire frames: pixel or tensor, as published)."""
        sent = self.total("sent")
        return self.total("bytes_sent") / sent if sent else 0.0

    def total(self, name: str) -> int:
        return sum(getattr(d, name) for d in self.devices)

    @property
    def dropped(self) -> dict[str, int]:
        return dict(sum((collections.Counter(d.dropped) for d in self.devices), collections.Counter()))

    def summary(self) -> str:
        acked = self.total("acked")
        rate = acked / self.seconds if self.seconds > 0 else 0.0
        drops = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        return (
            f"devices={len(self.devices)} generated={self.total('generated')} sent={self.total('sent')} "
            f"confirmed={acked} bytes={self.total('bytes_sent')} ({self.bytes_per_frame:.1f} per frame) "
            f"rate={rate:.1f} frames/s reconnects={max(0, self.total('connects') - len(self.devices))} "
            f"drops: {drops} in {self.seconds:.1f}s" + (f"; {self.head.describe()}" if self.head else "")
        )


def load_configured_head(cfg: PublishConfig) -> HeadRunner | None:
    """The partition head of `cfg.head` (onnxruntime imported only then), or None for pixel frames."""
    if not cfg.head:
        return None
    from publishers.head import load_head

    head = load_head(cfg.head, cfg.cut, cfg.tensor_codec)
    if cfg.source != "mnist" and head.frame_shape != cfg.shape():
        raise ConfigError(f"head {head.cut_id} takes {'x'.join(map(str, head.frame_shape))} frames, "
                          f"publish.frame_shape is {cfg.frame_shape}")
    return head


def build_devices(mqtt_cfg: MqttConfig, cfg: PublishConfig, head: HeadRunner | None = None) -> list[Device]:
    """One Device per configured device, each with its own source slice and noise RNG.

    head: the partition head every device runs on its frames (shared), which makes the devices publish
    tensor frames on edgeq/v1/tensors/<device_id>; None: `load_configured_head(cfg)` (pixel frames unless
    `cfg.head` is set).
    """
    head = head or load_configured_head(cfg)
    data = load_replay_data(cfg)
    seeds = np.random.SeedSequence(cfg.seed).spawn(cfg.devices)
    ids = [f"{cfg.device_prefix}{i}" for i in range(cfg.devices)]
    return [
        Device(
            device_id,
            make_source(cfg, i, data),
            mqtt_cfg,
            cfg,
            np.random.default_rng(seeds[i]),
            encoder=head.encode if head else None,
            topic=topics.tensors(device_id) if head else None,
        )
        for i, device_id in enumerate(ids)
    ]


def run_devices(
    devices: list[Device],
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    progress_s: float = 1.0,
    head: HeadRunner | None = None,
) -> PublishReport:
    """Run every device in its own thread until all finish or `stop` is set (`head`: reported, if given)."""
    stop = stop or threading.Event()
    results: dict[str, DeviceStats] = {}
    errors: list[BaseException] = []

    def target(device: Device) -> None:
        try:
            results[device.device_id] = device.run(stop)
        except BaseException as err:  # reported below, after the other devices finish
            logger.exception("device %s failed", device.device_id)
            errors.append(err)
            stop.set()

    started = time.monotonic()
    threads = [threading.Thread(target=target, args=(d,), name=f"edgeq-{d.device_id}", daemon=True) for d in devices]
    for t in threads:
        t.start()
    next_report = started + progress_s
    while any(t.is_alive() for t in threads):
        time.sleep(0.05)
        if progress and time.monotonic() >= next_report:
            next_report += progress_s
            live = PublishReport([d.stats for d in devices], time.monotonic() - started, head)
            running = [d for d, t in zip(devices, threads, strict=True) if t.is_alive()]
            progress(f"[publish] {_connection_state(running)} {live.summary()}")
    if errors:
        raise errors[0]
    return PublishReport([results[d.device_id] for d in devices], time.monotonic() - started, head)


def _connection_state(running: list[Device]) -> str:
    """"connected 3/4" over the devices still running, with the broker's refusal if none is connected."""
    if not running:
        return "all devices done"
    connected = sum(d.connected for d in running)
    state = f"connected {connected}/{len(running)}"
    if connected == 0:
        refused = next((d.refused for d in running if d.refused), None)
        why = f"refused: {refused}" if refused else "unreachable"
        state += f" (broker {running[0].mqtt_cfg.address} {why}, retrying)"
    return state


def publish(
    mqtt_cfg: MqttConfig,
    cfg: PublishConfig,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
) -> PublishReport:
    """Build the configured devices (with `cfg.head`: running that partition head) and run them to completion."""
    head = load_configured_head(cfg)
    devices = build_devices(mqtt_cfg, cfg, head)
    logger.info("publishing from %d devices to %s%s", len(devices), mqtt_cfg.address,
                f", tensor frames of {head.cut_id} ({head.codec})" if head else "")
    return run_devices(devices, stop, progress, cfg.progress_s, head)
