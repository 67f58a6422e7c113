"""Taking frames off the broker: a subscriber whose callback only fills a bounded queue."""

from __future__ import annotations

import collections
import contextlib
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


@dataclass(eq=False)
class Received:
    """One MQTT message as it arrived: topic, raw payload, local arrival time (ns, UTC).

    mid/qos/connection identify it for a manual acknowledgement (`Subscriber.ack`);
    `acked` is set once it was acknowledged (or needs no acknowledgement).
    """

    topic: str
    payload: bytes
    arrival_ns: int
    mid: int = 0
    qos: int = 0
    connection: int = 0
    acked: bool = False


class DropOldestQueue(queue.Queue):
    """A bounded FIFO whose `put_dropping_oldest` never blocks: when full it evicts the oldest item."""

    def put_dropping_oldest(self, item):  # -> the evicted item or None
        with self.not_full:  # the queue's mutex
            evicted = self._get() if 0 < self.maxsize <= self._qsize() else None
            self._put(item)
            if evicted is None:
                self.unfinished_tasks += 1
            self.not_empty.notify()
            return evicted


class Subscriber:
    """An MQTT client subscribed to one filter, feeding a bounded queue.

    When the queue is full, a QoS 0 message evicts the OLDEST queued message
    (counted as `dropped["queue_full"]`). A QoS 1 message taken with manual_ack
    instead waits up to QOS1_FULL_WAIT_S for room: paho's network thread stops
    reading, TCP pushes back, and the backlog stays in the broker's bounded
    session queue (Mosquitto 2.0.11 does not hold an acking client to
    `max_inflight_messages`, so this is the flow control that works). If there
    is still no room it is dropped UNacknowledged (`queue_full_qos1`): the broker
    redelivers it when the session reconnects. Otherwise the callback never
    blocks. Consumers call `get_batch()` from their own thread.

    manual_ack: acknowledge QoS 1 messages only when the consumer calls
        `ack(msg)` (at-least-once: the broker redelivers what was not acked
        when the client reconnects). Each unacked message holds one slot of the
        broker's per-client in-flight window (`max_inflight_messages`), which is
        what throttles a slow consumer at QoS 1; keep `max_queue` above it.
        Outgoing messages are then never held back by paho's own in-flight
        limit, so a publish is queued on the socket before any later PUBACK.
    """

    QOS1_FULL_WAIT_S = 2.0

    def __init__(
        self,
        mqtt_cfg: mqttlib.MqttConfig,
        client_id: str,
        topic_filter: str = topics.FRAMES_FILTER,
        max_queue: int = 10_000,
        persistent: bool = False,
        status_component: str | None = None,
        manual_ack: bool = False,
    ) -> None:
        self.mqtt_cfg = mqtt_cfg
        self.topic_filter = topic_filter
        self.queue: DropOldestQueue = DropOldestQueue(maxsize=max_queue)
        self.dropped: collections.Counter[str] = collections.Counter()
        self.subacks = 0
        self.connects = 0
        self.acks = 0
        self.manual_ack = manual_ack
        self._client = mqttlib.make_client(
            mqtt_cfg, client_id, status_component=status_component, persistent=persistent
        )
        if manual_ack:
            self._client.manual_ack_set(True)
            self._client.max_inflight_messages_set(0)  # 0 = unlimited: a result is never held behind its PUBACK
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
        self.connects += 1
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
        held = self.manual_ack and message.qos > 0
        msg = Received(message.topic, message.payload, time.time_ns(), message.mid, message.qos, self.connects,
                       acked=not held)
        if held:
            try:  # bounded wait: back-pressure to the broker instead of dropping an acknowledged frame
                self.queue.put(msg, timeout=self.QOS1_FULL_WAIT_S)
            except queue.Full:
                self.dropped["queue_full_qos1"] += 1  # not acked: redelivered when the session reconnects
            return
        evicted = self.queue.put_dropping_oldest(msg)
        if evicted is not None:
            self.dropped["queue_full"] += 1

    def ack(self, msg: Received) -> None:
        """Acknowledge a QoS 1 message taken with manual_ack (any thread; once per message).

        A message received on an earlier connection is not acked: the broker has
        redelivered it on the new one (its packet id may be reused), and that copy
        will be acked when it is handled.
        """
        if msg.acked:
            return
        msg.acked = True
        if msg.connection != self.connects:
            return
        self._client.ack(msg.mid, msg.qos)
        self.acks += 1

    def start(self) -> Subscriber:
        mqttlib.start(self._client, self.mqtt_cfg)
        return self

    def hold_writes(self):  # -> context manager
        """Nothing to hold: paho's network thread writes (see DrivenSubscriber)."""
        return contextlib.nullcontext()

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

    def publish(self, topic: str, payload: bytes, ack: list[Received] | tuple = ()):  # -> paho MQTTMessageInfo
        """Publish at the configured QoS on this subscriber's connection (paho queues it; any thread), then
        acknowledge the frames `ack`: their PUBACKs leave after this message, on the same connection."""
        self._last_publish = self._client.publish(topic, payload, qos=self.mqtt_cfg.qos)
        for msg in ack:
            self.ack(msg)
        return self._last_publish

    def unsubscribe(self, timeout: float = 5.0) -> bool:
        """Leave the subscription and wait for the broker's UNSUBACK: after it, no more messages come.

        Messages sent before it have already reached the queue (one connection delivers in order).
        Returns False if the broker did not acknowledge within `timeout` seconds.
        """
        return self.request_unsubscribe() and self._unsubscribed.wait(timeout)

    def request_unsubscribe(self) -> bool:
        """Send the UNSUBSCRIBE without waiting; `unsubscribed` turns true with the UNSUBACK.
        Returns False when not connected (nothing comes then anyway, and no resubscribe follows)."""
        rc, _ = self._client.unsubscribe(self.topic_filter)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._unsubscribed.set()
            return False
        return True

    @property
    def unsubscribed(self) -> bool:
        return self._unsubscribed.is_set()

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


class DrivenSubscriber(Subscriber):
    """A Subscriber whose MQTT I/O runs in the consumer's thread (`publishers.mqtt.DrivenLoop`), not paho's.

    `get_batch` reads the socket, so frames are taken off it when the consumer
    is ready for them, and results and acks are written by the same thread
    without waking another: no GIL hand-offs between two threads per frame
    (issue 7, edge actors at 916 frames/s: p99 39-87 ms with paho's thread,
    28-42 ms driven). Every call must come from that one thread; leave the
    subscription with `request_unsubscribe()` and keep calling `get_batch()`
    until `unsubscribed`. Inside `hold_writes()` results and acks wait in
    paho's queues and leave together when the block ends.

    With manual_ack, results go out on a second connection (client id
    `<client_id>-results`, clean session), and `publish(..., ack=msgs)`
    acknowledges `msgs` once the broker acknowledged the result: a frame is
    acked only when the broker holds its answer. Why a second connection:
    paho's `loop_read` reads as many packets per call as the client has
    publishes awaiting their PUBACK, and the PUBACKs of results published on
    the frames' connection queue behind the frames the broker already sent, so
    under overload one call could read thousands of frames. With nothing
    published on it, each call on the frames' connection reads one packet.

    Flow control at QoS 1 with manual_ack: a packet is read only while the
    queue has room; otherwise input stays in the socket, TCP pushes back on
    the broker, and the queue never holds more than `max_queue`. QoS 0 is
    always read and sheds the oldest queued frame, as in Subscriber.
    """

    POLL_MORE = 4  # after a read that handled packets, read again (without waiting) at most this often
    RESULTS_POLL_S = 1.0  # the results connection is polled at least this often (keepalive) when idle
    ACK_BATCH, ACK_DELAY_S = 64, 0.02  # released acks are written once this many wait, or the oldest this long

    def __init__(self, mqtt_cfg: mqttlib.MqttConfig, client_id: str, *args, **kwargs) -> None:
        super().__init__(mqtt_cfg, client_id, *args, **kwargs)
        self.client_id = client_id
        self.max_queue = self.queue.maxsize
        self.queue = DropOldestQueue()  # unbounded: the reader keeps QoS 1 within max_queue, QoS 0 evicts here
        self._loop: mqttlib.DrivenLoop | None = None
        self._out: mqttlib.DrivenLoop | None = None  # the results connection (manual_ack only)
        self._out_polled = 0.0
        self._ack_after: dict[int, list[Received]] = {}  # result mid -> frames acked once the broker has it
        self._ack_due: list[Received] = []  # released by their results' PUBACKs, not written yet
        self._ack_due_since = 0.0

    def _take(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        """An incoming PUBLISH (from paho's on_message, through the DrivenLoop). Without manual ack, paho has
        acknowledged it on arrival."""
        held = self.manual_ack and qos > 0
        msg = Received(topic, payload, time.time_ns(), mid, qos, self.connects, acked=not held)
        if not held and self.queue.qsize() >= self.max_queue:
            self.queue.get_nowait()
            self.dropped["queue_full"] += 1
        self.queue.put_nowait(msg)

    def start(self) -> DrivenSubscriber:
        """Set the session(s) up; the connections are made by the first `get_batch`."""
        self._loop = mqttlib.DrivenLoop(self._client, self.mqtt_cfg, on_message=self._take,
                                        hold_while_reading=not self.manual_ack)
        if self.manual_ack:
            out = mqttlib.make_client(self.mqtt_cfg, f"{self.client_id}-results")
            out.max_inflight_messages_set(0)  # a result is never held back behind paho's window
            self._out = mqttlib.DrivenLoop(out, self.mqtt_cfg, on_ack=self._result_acked, hold_while_reading=False)
        return self

    def _result_acked(self, mid: int) -> None:
        """The broker acknowledged result `mid`: the frames it answers may be acknowledged (`_write_acks`)."""
        msgs = self._ack_after.pop(mid, None)
        if msgs:
            if not self._ack_due:
                self._ack_due_since = time.monotonic()
            self._ack_due.extend(msgs)

    def _write_acks(self, force: bool = False) -> None:
        """Write the released acks together: at most every ACK_DELAY_S or ACK_BATCH acks (a PUBACK is not on
        any answer's path; each write costs a TCP segment the broker has to take in), or when `force`d."""
        due = self._ack_due
        if due and (force or len(due) >= self.ACK_BATCH or time.monotonic() - self._ack_due_since >= self.ACK_DELAY_S):
            self._ack_due = []
            with self._loop.hold_writes():
                for msg in due:
                    self.ack(msg)

    @contextlib.contextmanager
    def hold_writes(self):
        """Keep results and acks written in the block in paho's queues and send them together when it ends."""
        if self._loop is None:
            raise RuntimeError("DrivenSubscriber not started, or stopped")
        with self._loop.hold_writes(), (self._out.hold_writes() if self._out else contextlib.nullcontext()):
            yield

    def publish(self, topic: str, payload: bytes, ack: list[Received] | tuple = ()):  # -> paho MQTTMessageInfo
        """Publish at the configured QoS (written now, or when `hold_writes()` ends); acknowledge the frames
        `ack` once the broker acknowledged this message (QoS 0: once it was written)."""
        if self._loop is None:
            raise RuntimeError("DrivenSubscriber not started, or stopped")
        loop = self._out or self._loop
        info = self._last_publish = loop.publish(topic, payload, self.mqtt_cfg.qos)
        if ack:
            if self.mqtt_cfg.qos == 0 or self._out is None:
                for msg in ack:
                    self.ack(msg)
            elif info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_CONN_LOST):
                self._ack_after.setdefault(info.mid, []).extend(ack)  # paho keeps it until its PUBACK
        return info

    def _may_read(self) -> bool:
        return not self.manual_ack or self.mqtt_cfg.qos == 0 or self.queue.qsize() < self.max_queue

    def _poll_results(self, readable: bool = False) -> None:
        """The results connection: read its PUBACKs when `readable`, connect, keepalive (at most every
        RESULTS_POLL_S otherwise); write the acks the PUBACKs released when due."""
        out = self._out
        now = time.monotonic()
        if readable or now - self._out_polled >= self.RESULTS_POLL_S or not out.client.is_connected():
            self._out_polled = now
            out.poll(0.0)
        self._write_acks()

    def poll(self, timeout: float) -> None:
        """MQTT I/O: wait up to `timeout` s for input, then read everything the socket holds, while there is
        room for it (a PUBACK on the results connection ends the wait too, and is read)."""
        if self._loop is None:
            raise RuntimeError("DrivenSubscriber not started, or stopped")
        wake, out = None, self._out
        if out is not None:
            self._poll_results()
            if out.unacked:
                wake = out.client.socket()
            if self._ack_due:  # wake in time to write them
                timeout = min(timeout, max(0.0, self._ack_due_since + self.ACK_DELAY_S - time.monotonic()))
        handled = self._loop.poll(timeout, room=self._may_read, wake=wake)
        if self._loop.woke:
            self._poll_results(readable=True)
        if not handled:
            return
        for _ in range(self.POLL_MORE):  # bounded: a flood faster than this loop cannot keep it here
            if not (self._may_read() and self._loop.poll(0.0, room=self._may_read, wake=wake)):
                return
            if self._loop.woke:
                self._poll_results(readable=True)

    def get_batch(self, max_items: int, max_wait_s: float, linger_s: float = 0.0) -> list[Received]:
        """As Subscriber.get_batch, reading the socket meanwhile."""
        self.poll(0.0)
        deadline = time.monotonic() + max_wait_s
        while self.queue.empty():
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self.poll(left)
        deadline = time.monotonic() + linger_s
        while self.queue.qsize() < max_items and (left := deadline - time.monotonic()) > 0:
            self.poll(left)
        return [self.queue.get_nowait() for _ in range(min(max_items, self.queue.qsize()))]

    def stop(self) -> None:
        """Disconnect: paho writes the DISCONNECTs at once (no loop thread runs); no reconnect follows."""
        if self._loop is not None:
            self._loop.flush()  # whatever is still queued goes out before the DISCONNECT
        if self._out is not None:
            self._out.flush()
            self._out.client.disconnect()
        self._client.disconnect()
        self._loop = self._out = None

    def flush(self, timeout: float = 5.0) -> bool:
        """Run the I/O until the last result published here was acknowledged by the broker (QoS 1) or sent, and
        the acks it releases were written."""
        info, deadline = self._last_publish, time.monotonic() + timeout
        if info is None:
            return True
        try:
            while not info.is_published() or self._ack_after or self._ack_due or (
                    self._loop is not None and self._loop.unsent):
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning("results not flushed within %.1fs", timeout)
                    return False
                self.poll(min(0.05, left))
                self._write_acks(force=True)
        except (RuntimeError, ValueError) as err:  # written while the connection was down, or dropped
            logger.warning("results not flushed: %s", err)
            return False
        return True


def decode_frame(msg: Received, limits: wire.DecodeLimits = wire.DecodeLimits()) -> wire.Frame:  # noqa: B008 (frozen dataclass, as in wire.decode)
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
