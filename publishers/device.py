"""One device: reads its source, adds sensor noise, and publishes frames through a bounded outbox."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import paho.mqtt.client as mqtt

from publishers import mqtt as mqttlib
from publishers import results, topics, wire
from publishers.config import PublishConfig
from publishers.noise import NoiseConfig, add_noise
from publishers.sources import FrameSource

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 60.0
MAX_SLEEP_S = 0.05  # longest sleep between two looks at the socket (keepalive, reconnect, results)
# publish() outcomes after which paho keeps a QoS 1 message and sends it (again) once connected: not connected,
# or the connection broke while paho wrote it (paho writes at once when no loop thread runs).
KEPT = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_CONN_LOST)


@dataclass
class DeviceStats:
    """Counters of one device. `acked` = frames the broker confirmed (PUBACK at QoS 1)."""

    device_id: str
    generated: int = 0
    sent: int = 0
    acked: int = 0
    bytes_sent: int = 0
    resent: int = 0
    answered: int = 0
    connects: int = 0
    disconnects: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: collections.Counter())

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class Device:
    """A simulated (or real) device with its own MQTT client.

    Frames wait in a bounded outbox until the client is connected and fewer
    than `max_inflight` frames await their PUBACK; paho keeps those in-flight
    frames across reconnects and resends them, so QoS 1 loses nothing while
    the broker is away. A full outbox applies the configured drop policy.

    One thread does everything: `run` drives the client through
    `publishers.mqtt.DrivenLoop` (no paho network thread). Between two frames
    it sleeps until the next one is due, then reads whatever acks and results
    arrived meanwhile without waiting; it waits on the socket only when acks or
    results are what it needs (in-flight window or outbox full, draining).
    Why: on the 2-core test VM every timed wait costs 50-100 us of CPU, and
    with paho's thread a paced frame woke one thread or the other about four
    times (the publisher processes took 430-480 us of CPU per frame at 1,600
    frames/s, as much as the edge).

    With `cfg.resend_after_s > 0` the device also holds every sent frame until
    its result arrives (it subscribes to its results topic) and publishes it
    again, same seq, when none came in time: end-to-end at-least-once, which
    also covers frames a broker loses (Mosquitto 2.0.11 forgets shared
    subscriptions on restart, docs/reliability.md). Sent-but-unanswered plus
    queued frames stay within `queue_size` (policy `block`).
    """

    def __init__(
        self,
        device_id: str,
        source: FrameSource,
        mqtt_cfg: mqttlib.MqttConfig,
        cfg: PublishConfig,
        rng: np.random.Generator,
        encoder: Callable[[wire.Frame], bytes] | None = None,
        topic: str | None = None,
    ) -> None:
        self.device_id = device_id
        # encoder/topic: split computing sends a head's tensor frames instead (publishers.head, publishers.run).
        self.topic = topic or topics.frames_of_kind(cfg.topic, device_id)
        self._encode = encoder or wire.encode
        self.source = source
        self.mqtt_cfg = mqtt_cfg
        self.cfg = cfg
        self.noise = NoiseConfig(cfg.noise, cfg.noise_level)
        self.rng = rng
        self.stats = DeviceStats(device_id)
        self.component = f"device.{device_id}"
        self._outbox: collections.deque[tuple[int, bytes]] = collections.deque()  # (seq, wire frame)
        self.resend_after_s = cfg.resend_after_s if getattr(cfg, "topic", "frames") == "frames" else 0.0
        # seq -> (wire frame, when last published), oldest first; and seqs answered (appended inside poll)
        self._unanswered: collections.OrderedDict[int, tuple[bytes, float]] = collections.OrderedDict()
        self._answers: collections.deque[int] = collections.deque()
        self.bad_results = 0
        self._connected = False
        self.refused: str | None = None  # the broker's last CONNACK failure, if any
        self._announced = 0  # connects for which "online" was published
        self._acks = 0  # PUBACKs of every publish
        self._control_sent = 0  # status messages, whose acks are not frames
        self._client = mqttlib.make_client(mqtt_cfg, f"edgeq-{device_id}", status_component=self.component)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._loop: mqttlib.DrivenLoop | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    # paho callbacks, run inside DrivenLoop.poll (the device's own thread).
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            if self.refused is None:
                logger.warning("%s: broker refused connection: %s", self.device_id, reason_code)
            self.refused = str(reason_code)
            return
        self.refused = None
        if self.resend_after_s:
            client.subscribe(topics.results(self.device_id), qos=1)  # non-blocking, on every (re)connect
        self._connected = True
        self.stats.connects += 1

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self._connected = False
        self.stats.disconnects += 1

    def _on_ack(self, mid: int) -> None:
        """The broker acknowledged one of our publishes (QoS 1; QoS 0: it was written)."""
        self._acks += 1
        self._in_flight()  # keeps stats.acked current for readers in other threads (progress lines)

    def _on_incoming(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        """A PUBLISH on the results subscription (paho acknowledges it on arrival)."""
        self._on_result(payload)

    def _on_result(self, payload: bytes) -> None:
        try:
            rs = results.decode_all(payload)  # one result or a batch of this device's results
        except results.ResultDecodeError:
            self.bad_results += 1
            return
        self._answers.extend(r.seq for r in rs)

    def run(self, stop: threading.Event) -> DeviceStats:
        """Publish until `count` frames, `duration_s` or `stop`; then drain the outbox. Blocks: run each
        device in a thread of its own (`publishers.run.run_devices`)."""
        self._loop = mqttlib.DrivenLoop(self._client, self.mqtt_cfg, on_message=self._on_incoming, on_ack=self._on_ack)
        try:
            self._produce_loop(stop)
            self._drain(stop)
        finally:
            self._shutdown()
        return self.stats

    def _produce_loop(self, stop: threading.Event) -> None:
        period = 1.0 / self.cfg.rate_hz if self.cfg.rate_hz > 0 else 0.0
        started = time.monotonic()
        deadline = started + self.cfg.duration_s if self.cfg.duration_s > 0 else float("inf")
        samples = self.source.samples()
        next_due = started
        while not stop.is_set():
            now = time.monotonic()
            if now >= deadline or (self.cfg.count and self.stats.generated >= self.cfg.count):
                return
            if now >= next_due and self._room_for_one():
                sample = next(samples, None)
                if sample is None:
                    return
                self._enqueue(*sample)
                # Keep the schedule, but do not burst to catch up after a long stall.
                next_due = max(next_due + period, now - period)
            self._pump()
            self._wait(next_due)

    def _wait(self, next_due: float) -> None:
        """Sleep until the next frame is due (at most MAX_SLEEP_S), then take in the acks and results that
        came meanwhile, without waiting. Wait on the socket instead when they are what the device needs."""
        if not self._room_for_one():
            self._loop.poll(MAX_SLEEP_S)  # policy block: results (and acks) make room
            return
        wait = min(next_due - time.monotonic(), MAX_SLEEP_S)
        if self._outbox and self._connected and self._in_flight() >= self.mqtt_cfg.max_inflight:
            self._loop.poll(max(wait, 0.0))  # frames wait for the in-flight window: take acks as they come
            return
        if wait > 0:
            time.sleep(wait)
        self._loop.poll(0.0)

    def _room_for_one(self) -> bool:
        return len(self._outbox) + len(self._unanswered) < self.cfg.queue_size or self.cfg.drop_policy != "block"

    def _enqueue(self, pixels: np.ndarray, label: int | None) -> None:
        flags = 0
        if self.noise.enabled:
            pixels = add_noise(pixels, self.noise, self.rng)
            flags |= wire.FLAG_NOISY
        frame = wire.Frame(self.device_id, self.stats.generated, time.time_ns(), pixels, label, flags)
        self.stats.generated += 1
        if len(self._outbox) >= self.cfg.queue_size:
            self.stats.dropped["queue_full"] += 1
            if self.cfg.drop_policy == "drop-newest":
                return
            self._outbox.popleft()  # drop-oldest
        self._outbox.append((frame.seq, self._encode(frame)))
        if len(self._unanswered) > self.cfg.queue_size:  # drop policies only: give up the oldest wait
            self._unanswered.popitem(last=False)
            self.stats.dropped["unanswered_full"] += 1

    def _pump(self) -> None:
        """Hand frames to paho while connected and under the in-flight window."""
        self._settle()
        if self._connected and self._announced < self.stats.connects:
            self._announced = self.stats.connects
            self._publish_status(topics.ONLINE)
        while self._outbox and self._connected and self._in_flight() < self.mqtt_cfg.max_inflight:
            seq, payload = self._outbox.popleft()
            info = self._client.publish(self.topic, payload, qos=self.mqtt_cfg.qos)
            if info.rc not in KEPT:
                self.stats.dropped[f"paho_{mqtt.error_string(info.rc)}"] += 1
                continue
            if info.rc != mqtt.MQTT_ERR_SUCCESS and self.mqtt_cfg.qos == 0:
                self.stats.dropped["disconnected"] += 1  # QoS 0 is not kept by paho
                continue
            self.stats.sent += 1
            self.stats.bytes_sent += len(payload)
            if self.resend_after_s:
                self._unanswered[seq] = (payload, time.monotonic())
                self._unanswered.move_to_end(seq)

    def _settle(self) -> None:
        """Forget answered frames; put frames unanswered for `resend_after_s` back at the head of the outbox."""
        while self._answers:
            if self._unanswered.pop(self._answers.popleft(), None) is not None:
                self.stats.answered += 1
        if not self.resend_after_s:
            return
        now, due = time.monotonic(), []
        for seq, (payload, sent_at) in self._unanswered.items():
            if now - sent_at < self.resend_after_s:
                break
            due.append((seq, payload))
        for seq, payload in reversed(due):
            del self._unanswered[seq]
            self._outbox.appendleft((seq, payload))
        self.stats.resent += len(due)

    def _publish_status(self, state: bytes) -> mqtt.MQTTMessageInfo:
        self._control_sent += 1
        return self._client.publish(topics.status(self.component), state, qos=1, retain=True)

    def _in_flight(self) -> int:
        # Totals, not per-message bookkeeping (read by other threads for progress lines).
        in_flight = self.stats.sent + self._control_sent - self._acks
        self.stats.acked = self.stats.sent - max(0, in_flight)
        return in_flight

    def _drain(self, stop: threading.Event) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while (self._outbox or self._in_flight() > 0 or self._unanswered) and time.monotonic() < deadline:
            if stop.is_set() and not self._connected:
                break
            self._pump()
            self._loop.poll(MAX_SLEEP_S)
        lost = len(self._outbox) + max(0, self._in_flight())
        if lost:
            logger.warning("%s: %d frames not confirmed by the broker at shutdown", self.device_id, lost)
            self.stats.dropped["unconfirmed_at_exit"] += lost
        if self._unanswered:
            logger.warning("%s: %d frames without a result at shutdown", self.device_id, len(self._unanswered))
            self.stats.dropped["unanswered_at_exit"] += len(self._unanswered)

    def _shutdown(self) -> None:
        """Publish "offline" (waiting up to 2 s for its ack), then DISCONNECT (paho closes the socket)."""
        if self._connected:
            info = self._publish_status(topics.OFFLINE)
            deadline = time.monotonic() + 2.0
            try:
                while self._connected and not info.is_published() and time.monotonic() < deadline:
                    self._loop.poll(MAX_SLEEP_S)
            except (RuntimeError, ValueError):  # not sent: the connection was down
                pass
        self._loop.flush()
        self._client.disconnect()
