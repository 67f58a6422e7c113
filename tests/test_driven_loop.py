"""publishers.mqtt.DrivenLoop: paho driven through its public external-loop API, against real Mosquitto
and a scripted broker.

A scripted broker (a loopback TCP server that answers CONNECT and then sends the bytes a test gives it)
cuts PUBLISH packets across TCP reads at many positions: each message arrives once, whole, in order; a
malformed packet drops the connection, delivers nothing, and the loop reconnects. Against Mosquitto, with
MQTT 3.1.1 and 5, the edge's DrivenSubscriber takes every frame once and in order; results written inside
`hold_writes()` leave when it ends and reach another client; manual acks are honoured by the broker (no
redelivery to the same session).
"""

from __future__ import annotations

import dataclasses
import queue
import socket
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from edge_workers.ingest import DrivenSubscriber
from publishers import topics
from publishers.mqtt import DrivenLoop, MqttConfig, make_client
from tests.conftest import collect


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(topic: str, payload: bytes, qos: int, mid: int = 0, properties: bytes | None = None) -> bytes:
    """An MQTT PUBLISH packet as a broker sends it (properties: MQTT 5 property bytes, None for 3.1.1)."""
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + (mid.to_bytes(2, "big") if qos else b"")
    if properties is not None:
        body += _varint(len(properties)) + properties
    body += payload
    return bytes((0x30 | (qos << 1),)) + _varint(len(body)) + body


def _read_packet(conn: socket.socket) -> bytes:
    """One whole MQTT packet from a blocking socket (fixed header included)."""
    head = conn.recv(1)
    length, shift, raw = 0, 0, b""
    while True:
        byte = conn.recv(1)
        raw += byte
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    body = b""
    while len(body) < length:
        body += conn.recv(length - len(body))
    return head + raw + body


class ScriptedBroker:
    """Accepts connections on 127.0.0.1, answers each CONNECT with a CONNACK; the test writes the rest."""

    def __init__(self, protocol: str) -> None:
        self.connack = b"\x20\x03\x00\x00\x00" if protocol == "5" else b"\x20\x02\x00\x00"
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: queue.Queue[socket.socket] = queue.Queue()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _read_packet(conn)  # CONNECT
            conn.sendall(self.connack)
            self.conns.put(conn)

    def close(self) -> None:
        self.server.close()


def _driven(broker: ScriptedBroker, protocol: str, got: list) -> tuple[DrivenLoop, socket.socket]:
    """A DrivenLoop connected to the scripted broker: (loop, the broker's end of the connection)."""
    cfg = MqttConfig(port=broker.port, protocol=protocol, reconnect_min_s=0.05, reconnect_max_s=0.2)
    loop = DrivenLoop(make_client(cfg, "scripted"), cfg, on_message=lambda *m: got.append(m))
    conn = _next_connection(loop, broker)
    return loop, conn


def _next_connection(loop: DrivenLoop, broker: ScriptedBroker) -> socket.socket:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        loop.poll(0.02)
        try:
            conn = broker.conns.get_nowait()
        except queue.Empty:
            continue
        while not loop.client.is_connected() and time.monotonic() < deadline:
            loop.poll(0.02)  # reads the CONNACK
        return conn
    raise AssertionError("the loop did not connect to the scripted broker")


def _poll_until(loop: DrivenLoop, done, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        loop.poll(0.01)


MESSAGES = [("edgeq/v1/frames/d0", b"x" * 5, 1, 7), ("edgeq/v1/frames/d1", b"", 0, 0),
            ("edgeq/v1/frames/d2", bytes(range(256)) * 3, 1, 65535)]  # 2-byte remaining length


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_packets_cut_across_reads_arrive_whole_once_and_in_order(protocol) -> None:
    props = None if protocol == "3.1.1" else b"\x01\x01"  # payload format indicator = 1
    stream = b"".join(publish_packet(t, p, q, m, props) for t, p, q, m in MESSAGES)
    # every cut in the first packet's header and topic, around each packet boundary, and in the big payload
    bounds = [len(publish_packet(t, p, q, m, props)) for t, p, q, m in MESSAGES]
    edges = [sum(bounds[:i]) for i in range(1, len(bounds))]
    cuts = sorted(set(range(0, 24)) | {e + d for e in edges for d in (-2, -1, 0, 1, 2, 3)}
                  | {len(stream) - 1, len(stream) - 400})
    broker = ScriptedBroker(protocol)
    got: list = []
    loop, conn = _driven(broker, protocol, got)
    try:
        for i, cut in enumerate(cuts):
            conn.sendall(stream[:cut])
            for _ in range(3):
                loop.poll(0.005)  # paho reads the partial packet and keeps it
            conn.sendall(stream[cut:])
            _poll_until(loop, lambda i=i: len(got) == (i + 1) * len(MESSAGES))
            assert got[i * len(MESSAGES):] == [(t, p, m, q) for t, p, q, m in MESSAGES], cut
        assert len(got) == len(cuts) * len(MESSAGES)
    finally:
        loop.client.disconnect()
        broker.close()


@pytest.mark.parametrize("bad", [
    bytes((0x32, 0xFF, 0xFF, 0xFF, 0xFF, 0x01)),               # remaining length of 5 bytes
    bytes((0x32, 0x03, 0x00, 0x09, 0x61)),                     # topic longer than the packet
    bytes((0x32, 0x03, 0x00, 0x01, 0x61)),                     # QoS 1 without its packet id
])
def test_a_malformed_packet_delivers_nothing_and_the_loop_reconnects(bad) -> None:
    broker = ScriptedBroker("3.1.1")
    got: list = []
    loop, conn = _driven(broker, "3.1.1", got)
    try:
        conn.sendall(bad + publish_packet("edgeq/v1/frames/d0", b"after", 1, 1))
        again = _next_connection(loop, broker)  # the connection was dropped and made again
        assert got == []
        again.sendall(publish_packet("edgeq/v1/frames/d0", b"fine", 1, 2))
        _poll_until(loop, lambda: got)
        assert got == [("edgeq/v1/frames/d0", b"fine", 2, 1)]
    finally:
        loop.client.disconnect()
        broker.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_driven_subscriber_takes_every_frame_writes_results_and_acks(broker, mqtt_cfg, protocol) -> None:
    cfg = dataclasses.replace(mqtt_cfg, protocol=protocol)
    group = topics.shared(topics.FRAMES_FILTER, "dl")
    sub = DrivenSubscriber(cfg, f"dl-edge-{protocol}", group, persistent=True, manual_ack=True,
                           max_queue=50).start()
    deadline = time.monotonic() + 10
    while not sub.subacks and time.monotonic() < deadline:
        sub.get_batch(1, 0.05)
    assert sub.subacks
    assert sub._client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # acks never wait for Nagle
    results: list[bytes] = []
    reader = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dl-results-{protocol}")
    reader.on_message = lambda c, u, m: results.append(m.payload)
    reader.connect(cfg.host, cfg.port)
    reader.subscribe(topics.RESULTS_FILTER, qos=1)
    reader.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dl-pub-{protocol}")
    pub.connect(cfg.host, cfg.port)
    pub.loop_start()
    n = 400
    try:
        time.sleep(0.3)  # the reader's subscription is in place
        sent = [f"{i:05d}".encode() * (1 + i % 60) for i in range(n)]  # 5..300 bytes: 1- and 2-byte lengths
        for payload in sent:
            pub.publish(topics.frames("d0"), payload, qos=1)
        got = []
        deadline = time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            batch = sub.get_batch(64, 0.1)
            assert sub.queue.qsize() <= 50  # the bound holds (one result message per batch, as the edge does)
            if not batch:
                continue
            with sub.hold_writes():
                sub.publish(topics.results("d0"), b"".join(b"r" + msg.payload[:5] for msg in batch), ack=batch)
                assert sub._out.unsent  # held in paho's queue until the block ends
            assert not sub._out.unsent
            got.extend(batch)
        assert [m.payload for m in got] == sent
        assert sub.flush(5)
        deadline = time.monotonic() + 10
        want = b"".join(b"r" + p[:5] for p in sent)
        while len(b"".join(results)) < len(want) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b"".join(results) == want
        assert sub.acks == n
    finally:
        sub.stop()
        for c in (reader, pub):
            c.loop_stop()
            c.disconnect()
    if protocol == "5":
        return  # a new MQTT 5 client starts clean (clean start on first connect): nothing to check there
    # Acked: the same session gets nothing back (MQTT 3.1.1 persistent session).
    again = DrivenSubscriber(cfg, f"dl-edge-{protocol}", group, persistent=True, manual_ack=True).start()
    try:
        assert collect(again, 1, timeout=2) == []
    finally:
        again.stop()


def test_packets_larger_than_a_socket_read_arrive_whole(broker, mqtt_cfg) -> None:
    """A message of hundreds of KB takes paho many reads and several polls."""
    sub = DrivenSubscriber(mqtt_cfg, "dl-big", topics.FRAMES_FILTER, manual_ack=True, max_queue=2).start()
    deadline = time.monotonic() + 10
    while not sub.subacks and time.monotonic() < deadline:
        sub.get_batch(1, 0.05)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dl-big-pub")
    pub.connect(mqtt_cfg.host, mqtt_cfg.port)
    pub.loop_start()
    try:
        sent = [bytes([i]) * (3 * 65536 + 17 * i) for i in range(5)]
        for payload in sent:
            pub.publish(topics.frames("d0"), payload, qos=1)
        got = collect(sub, len(sent), timeout=20)
        assert [m.payload for m in got] == sent
    finally:
        sub.stop()
        pub.loop_stop()
        pub.disconnect()


def test_without_manual_ack_qos1_frames_are_acknowledged_on_arrival(broker, mqtt_cfg) -> None:
    """Without manual ack paho acknowledges on arrival; inside the loop's reads those acks are held and sent
    after the read, so they must still leave."""
    early: list = []  # taken while waiting for the SUBACK (a resumed session's redeliveries come first)

    def subscriber() -> DrivenSubscriber:
        sub = DrivenSubscriber(mqtt_cfg, "dl-auto", topics.FRAMES_FILTER, persistent=True).start()
        deadline = time.monotonic() + 10
        while not sub.subacks and time.monotonic() < deadline:
            early.extend(sub.get_batch(100, 0.05))
        return sub

    sub = subscriber()
    assert early == []
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dl-auto-pub")
    pub.connect(mqtt_cfg.host, mqtt_cfg.port)
    pub.loop_start()
    try:
        for i in range(20):
            pub.publish(topics.frames("d0"), b"%d" % i, qos=1)
        assert [m.payload for m in collect(sub, 20, timeout=10)] == [b"%d" % i for i in range(20)]
        sub.get_batch(1, 0.2)  # the PUBACKs leave
        sub._client.socket().close()  # a crash, the persistent session stays
        sub = subscriber()
        assert early + collect(sub, 1, timeout=2) == []  # every one was acknowledged: nothing redelivered
    finally:
        sub.stop()
        pub.loop_stop()
        pub.disconnect()
