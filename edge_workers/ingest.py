"""Taking frames off the broker: a subscriber whose callback only fills a bounded queue."""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from publishers import mqtt as mqttlib
from publishers import topics, wire
from publishers.errors import FrameDecodeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Received:
    """One MQTT message as it arrived: topic, raw payload, local arrival time (ns, UTC)."""

    topic: str
    payload: bytes
    arrival_ns: int


class Subscriber:
    """An MQTT client subscribed to one filter, feeding a bounded queue.

    The paho callback never blocks: when the queue is full the message is
    dropped and counted under `dropped["queue_full"]`. Consumers call
    `get_batch()` from their own thread.
    """

    def __init__(
        self,
        mqtt_cfg: mqttlib.MqttConfig,
        client_id: str,
        topic_filter: str = topics.FRAMES_FILTER,
        max_queue: int = 10_000,
        persistent: bool = False,
        status_component: str | None = None,
    ) -> None:
        self.mqtt_cfg = mqtt_cfg
        self.topic_filter = topic_filter
        self.queue: queue.Queue[Received] = queue.Queue(maxsize=max_queue)
        self.dropped: collections.Counter[str] = collections.Counter()
        self.subacks = 0
        self._client = mqttlib.make_client(
            mqtt_cfg, client_id, status_component=status_component, persistent=persistent
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = lambda *args: self._unsubscribed.set()
        self._unsubscribed = threading.Event()
        self._last_publish = None

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            logger.warning("subscriber refused by broker: %s", reason_code)
            return
        if self._unsubscribed.is_set():
            return
        # paho's documented pattern: (re)subscribe on every connect. Non-blocking.
        client.subscribe(self.topic_filter, qos=self.mqtt_cfg.qos)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            logger.warning("broker refused subscription to %s: %s", self.topic_filter, failed[0])
            return
        self.subacks += 1

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        try:
            self.queue.put_nowait(Received(message.topic, message.payload, time.time_ns()))
        except queue.Full:
            self.dropped["queue_full"] += 1

    def start(self) -> "Subscriber":
        mqttlib.start(self._client, self.mqtt_cfg)
        return self

    def wait_subscribed(self, timeout: float = 10.0) -> None:
        """Block until the broker acknowledged the subscription. Raises RuntimeError on timeout."""
        deadline = time.monotonic() + timeout
        while self.subacks == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"subscriber not subscribed on {self.mqtt_cfg.address} after {timeout}s")
            time.sleep(0.01)

    def get_batch(self, max_items: int, max_wait_s: float, linger_s: float = 0.0) -> list[Received]:
        """Up to `max_items` messages: waits at most `max_wait_s` for the first, then at most
        `linger_s` more for the batch to fill (0 = take only what is already queued)."""
        try:
            batch = [self.queue.get(timeout=max_wait_s)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + linger_s
        while len(batch) < max_items:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
        return batch

    def publish(self, topic: str, payload: bytes):  # -> paho MQTTMessageInfo
        """Publish at the configured QoS on this subscriber's connection (paho queues it; any thread)."""
        self._last_publish = self._client.publish(topic, payload, qos=self.mqtt_cfg.qos)
        return self._last_publish

    def unsubscribe(self, timeout: float = 5.0) -> bool:
        """Leave the subscription and wait for the broker's UNSUBACK: after it, no more messages come.

        Messages sent before it have already reached the queue (one connection delivers in order).
        Returns False if the broker did not acknowledge within `timeout` seconds.
        """
        rc, _ = self._client.unsubscribe(self.topic_filter)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._unsubscribed.set()  # not connected: nothing comes anyway; do not resubscribe
            return False
        return self._unsubscribed.wait(timeout)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the last message published here left (QoS 1: was acknowledged by the broker)."""
        info = self._last_publish
        if info is None:
            return True
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as err:  # not connected, or the message was dropped
            logger.warning("results not flushed: %s", err)
            return False
        return info.is_published()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def decode_frame(msg: Received, limits: wire.DecodeLimits = wire.DecodeLimits()) -> wire.Frame:
    """Decode a frames-topic message and check the topic names the frame's device.

    Raises FrameDecodeError (reason `topic_mismatch` or a wire reason).
    """
    frame = wire.decode(msg.payload, limits)
    try:
        topic_device = topics.device_of(msg.topic, "frames")
    except ValueError as err:
        raise FrameDecodeError("topic_mismatch", str(err)) from err
    if topic_device != frame.device_id:
        raise FrameDecodeError(
            "topic_mismatch", f"topic names device {topic_device!r}, frame header says {frame.device_id!r}"
        )
    return frame
