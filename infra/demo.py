"""`edgeq demo`: a broker, simulated devices and the edge ingest on one machine, with a summary."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from edge_workers.ingest import Subscriber, decode_frame
from infra.broker import MosquittoBroker
from publishers.config import PublishConfig
from publishers.errors import FrameDecodeError
from publishers.mqtt import MqttConfig
from publishers.run import Progress, PublishReport, publish

logger = logging.getLogger(__name__)


@dataclass
class ArrivalStats:
    """What reached the edge: counts, order per device, bytes, capture-to-arrival latency."""

    frames: int = 0
    bytes: int = 0
    unique: set[tuple[str, int]] = field(default_factory=set)
    out_of_order: int = 0
    decode_errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    last_seq: dict[str, int] = field(default_factory=dict)

    def add(self, frame_bytes: int, device_id: str, seq: int, latency_ms: float) -> None:
        self.frames += 1
        self.bytes += frame_bytes
        self.unique.add((device_id, seq))
        if seq <= self.last_seq.get(device_id, -1):
            self.out_of_order += 1
        self.last_seq[device_id] = max(seq, self.last_seq.get(device_id, -1))
        self.latencies_ms.append(latency_ms)


def consume(sub: Subscriber, stats: ArrivalStats, stop: threading.Event) -> None:
    """Decode everything the subscriber queues until `stop` is set and the queue is empty."""
    while not (stop.is_set() and sub.queue.empty()):
        for msg in sub.get_batch(256, 0.05):
            try:
                frame = decode_frame(msg)
            except FrameDecodeError as err:
                stats.decode_errors[err.reason] = stats.decode_errors.get(err.reason, 0) + 1
                continue
            stats.add(len(msg.payload), frame.device_id, frame.seq, (msg.arrival_ns - frame.capture_ns) / 1e6)


def summary(report: PublishReport, arrived: ArrivalStats, broker: str, edge_drops: dict[str, int]) -> str:
    confirmed = report.total("acked")
    lost = max(0, confirmed - len(arrived.unique))
    lat = np.array(arrived.latencies_ms or [float("nan")])
    lines = [
        "edgeq demo summary",
        f"  broker               {broker}",
        f"  devices              {len(report.devices)}",
        f"  frames sent          {confirmed} (confirmed by the broker), drops at devices: {report.dropped or 'none'}",
        f"  frames at the edge   {len(arrived.unique)} unique, {arrived.frames - len(arrived.unique)} duplicates, "
        f"{arrived.out_of_order} out of order, lost {lost}",
        f"  decode errors        {arrived.decode_errors or 'none'}",
        f"  drops at the edge    {edge_drops or 'none'}",
        f"  throughput           {len(arrived.unique) / max(report.seconds, 1e-9):.1f} frames/s over {report.seconds:.1f}s",
        f"  latency capture->edge p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms",
        f"  bytes device->edge   {arrived.bytes} ({arrived.bytes / max(arrived.frames, 1):.0f} per frame)",
        "  edge/cloud inference not wired in yet: this demo shows the device->edge hop only",
    ]
    return "\n".join(lines)


def run_demo(mqtt_cfg: MqttConfig, pub_cfg: PublishConfig, use_broker: bool, progress: Progress) -> str:
    """Run the demo and return its summary text. `use_broker`: connect to mqtt_cfg instead of starting one."""
    with contextlib.ExitStack() as stack:
        if not use_broker:
            broker = stack.enter_context(MosquittoBroker())
            mqtt_cfg = dataclasses.replace(mqtt_cfg, host=broker.host, port=broker.port)
            progress(f"[demo] started mosquitto on {broker.address}")
        sub = Subscriber(mqtt_cfg, "edgeq-demo-edge").start()
        stack.callback(sub.stop)
        sub.wait_subscribed()
        arrived = ArrivalStats()
        stop = threading.Event()
        consumer = threading.Thread(target=consume, args=(sub, arrived, stop), daemon=True)
        consumer.start()
        progress(f"[demo] {pub_cfg.devices} devices publishing to {mqtt_cfg.address}")
        report = publish(mqtt_cfg, pub_cfg, progress=progress)
        deadline = time.monotonic() + 10.0
        while len(arrived.unique) < report.total("acked") and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        consumer.join()
        return summary(report, arrived, mqtt_cfg.address, dict(sub.dropped))
