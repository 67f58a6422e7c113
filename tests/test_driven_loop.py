"""publishers.mqtt.DrivenLoop: packets split from a read buffer, buffered writes; against real Mosquitto.

The parser is checked on byte streams cut at every position (a socket may
return any prefix), then the edge's DrivenSubscriber is run against the broker
with MQTT 3.1.1 and 5: every frame arrives once, in order, with its payload;
results written inside `hold_writes()` reach another client; acks written as
raw PUBACKs are honoured by the broker (no redelivery to the same session).
"""

from __future__ import annotations

import dataclasses
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


def _loop(protocol: str = "3.1.1") -> tuple[DrivenLoop, list]:
    got: list = []
    cfg = MqttConfig(protocol=protocol)
    loop = DrivenLoop(make_client(cfg, "parser-test"), cfg, on_publish=lambda *m: got.append(m))
    return loop, got


MESSAGES = [("edgeq/v1/frames/d0", b"x" * 5, 1, 7), ("edgeq/v1/frames/d1", b"", 0, 0),
            ("edgeq/v1/frames/d2", bytes(range(256)) * 3, 1, 65535)]  # 2-byte remaining length


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_packets_are_split_the_same_way_wherever_the_reads_cut_the_stream(protocol) -> None:
    props = None if protocol == "3.1.1" else b"\x01\x01"  # payload format indicator = 1
    stream = b"".join(publish_packet(t, p, q, m, props) for t, p, q, m in MESSAGES)
    for cut in range(len(stream) + 1):
        loop, got = _loop(protocol)
        for chunk in (stream[:cut], stream[cut:]):
            loop._in += chunk
            loop._handle(lambda: True)
        assert got == [(t, p, m, q) for t, p, q, m in MESSAGES], cut
        assert not loop._in


def test_no_room_leaves_packets_in_the_buffer_in_order() -> None:
    stream = b"".join(publish_packet(t, p, q, m) for t, p, q, m in MESSAGES)
    loop, got = _loop()
    loop._in += stream
    assert loop._handle(lambda: len(got) < 1)
    assert [g[0] for g in got] == ["edgeq/v1/frames/d0"]
    assert not loop._handle(lambda: False)
    loop._handle(lambda: True)
    assert [g[0] for g in got] == [t for t, *_ in MESSAGES]


@pytest.mark.parametrize("bad", [
    bytes((0x32, 0xFF, 0xFF, 0xFF, 0xFF, 0x01)),               # remaining length of 5 bytes
    bytes((0x32, 0x03, 0x00, 0x09, 0x61)),                     # topic longer than the packet
    bytes((0x32, 0x03, 0x00, 0x01, 0x61)),                     # QoS 1 without its packet id
])
def test_a_malformed_packet_drops_the_connection_and_delivers_nothing(bad) -> None:
    loop, got = _loop()
    lost: list = []
    loop.client.on_disconnect = lambda *a: lost.append(a)
    loop._in += bad + publish_packet("edgeq/v1/frames/d0", b"after", 1, 1)
    loop._handle(lambda: True)
    assert got == [] and not loop._in and len(lost) == 1


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
            assert sub.queue.qsize() <= 50  # the bound holds with buffered reads
            with sub.hold_writes():
                for msg in batch:
                    sub.publish(topics.results("d0"), b"r" + msg.payload[:5])
                    sub.ack(msg)
            got.extend(batch)
        assert [m.payload for m in got] == sent
        assert sub.flush(5)
        deadline = time.monotonic() + 10
        while len(results) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert results == [b"r" + p[:5] for p in sent]
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


def test_packets_larger_than_a_read_chunk_arrive_whole(broker, mqtt_cfg) -> None:
    """A frame bigger than READ_CHUNK takes several reads; the buffer grows for it (it once stalled)."""
    sub = DrivenSubscriber(mqtt_cfg, "dl-big", topics.FRAMES_FILTER, manual_ack=True, max_queue=2).start()
    deadline = time.monotonic() + 10
    while not sub.subacks and time.monotonic() < deadline:
        sub.get_batch(1, 0.05)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dl-big-pub")
    pub.connect(mqtt_cfg.host, mqtt_cfg.port)
    pub.loop_start()
    try:
        sent = [bytes([i]) * (3 * DrivenLoop.READ_CHUNK + 17 * i) for i in range(5)]
        for payload in sent:
            pub.publish(topics.frames("d0"), payload, qos=1)
        got = collect(sub, len(sent), timeout=20)
        assert [m.payload for m in got] == sent
    finally:
        sub.stop()
        pub.loop_stop()
        pub.disconnect()


def test_without_manual_ack_qos1_frames_are_acknowledged_on_arrival(broker, mqtt_cfg) -> None:
    """The fast path bypasses paho's PUBLISH handler, so it must send the automatic PUBACK itself."""
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
