"""Hostile payloads through a real Mosquitto to a real edge worker Ray actor: every one counted, none fatal.

Hypothesis generates malformed, truncated, lying, oversized-shape and
semantically wrong frames (wrong dtype, NaN/Inf, out-of-range floats, wrong
shape, topic/device mismatch, odd topic levels, random bytes), each tagged with
the rejection reason the decoder or the edge must give. Every example is
published interleaved with valid labelled frames (uint8 and float) and must
come back as: each valid frame answered, each bad one counted under its
reason, no batch dropped, the worker alive.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from collections import Counter

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cloud_workers.config import RayConfig
from edge_workers.config import EdgeConfig
from edge_workers.ingest import Received, decode_frame
from edge_workers.processor import FrameRejected, frame_pixels
from infra import cluster
from infra.broker import MosquittoBroker
from infra.collector import ResultCollector
from publishers import mqtt as mqttlib
from publishers import topics, wire
from publishers.datasets import load_mnist
from publishers.errors import FrameDecodeError
from tests.conftest import DATA_DIR

BAD_DEVICE = "hostile0"
BAD_TOPIC = topics.frames(BAD_DEVICE)
UNDELIVERABLE = "undeliverable"  # a topic the edge's filter edgeq/v1/frames/+ never matches
EXAMPLES, CASES = 120, (92, 100)  # ~11,500 bad payloads, ~10,600 of them delivered to the edge


class Case:
    """One message: topic, payload, and the rejection reason expected (None where the generator cannot tell)."""

    __slots__ = ("payload", "reason", "topic")

    def __init__(self, topic: str, payload: bytes, reason: str | None):
        self.topic, self.payload, self.reason = topic, payload, reason

    def __repr__(self) -> str:  # short, for hypothesis's report of a failing example
        return f"Case({self.topic!r}, {len(self.payload)} B {self.payload[:40]!r}..., {self.reason!r})"


MNIST = load_mnist(DATA_DIR, "train")  # valid frames only; nothing is learned or evaluated here


# ------------------------------------------------------------------ payload builders


def frame_bytes(pixels: np.ndarray, device: str = BAD_DEVICE, seq: int = 0, label: int | None = None) -> bytes:
    return wire.encode(wire.Frame(device, seq, time.time_ns(), pixels, label))


def raw_frame(*, magic: bytes = wire.MAGIC, version: int = wire.VERSION, code: int = 1, ndim: int | None = None,
              flags: int = 0, id_len: int | None = None, payload_len: int | None = None,
              shape: tuple[int, ...] = (28, 28), device: bytes = BAD_DEVICE.encode(),
              pixels: bytes | None = None) -> bytes:
    """A frame with any header field forced, bypassing the encoder's checks."""
    itemsize = wire.DTYPE_CODES.get(code, np.dtype("u1")).itemsize
    if pixels is None:
        pixels = bytes(math.prod(shape) * itemsize)
    ndim = len(shape) if ndim is None else ndim
    header = wire.HEADER.pack(magic, version, code, ndim, flags, 0, len(device) if id_len is None else id_len, 0,
                              len(pixels) if payload_len is None else payload_len, 1, time.time_ns())
    return header + struct.pack(f"<{len(shape)}I", *shape) + device + pixels


def body_size(ndim: int, id_len: int) -> int:
    return wire.HEADER_SIZE + 4 * ndim + id_len


# ------------------------------------------------------------------ strategies, one per kind of hostility

images = st.integers(0, len(MNIST) - 1).map(lambda i: MNIST.images[i])


@st.composite
def random_bytes(draw) -> Case:
    data = draw(st.binary(max_size=300))
    reason = "short_header" if len(data) < wire.HEADER_SIZE else "bad_magic" if data[:4] != wire.MAGIC else None
    return Case(BAD_TOPIC, data, reason)


@st.composite
def truncated(draw) -> Case:
    good = frame_bytes(draw(images))
    cut = draw(st.integers(0, len(good) - 1))
    return Case(BAD_TOPIC, good[:cut], "short_header" if cut < body_size(2, len(BAD_DEVICE)) else "payload_size")


@st.composite
def trailing_bytes(draw) -> Case:
    return Case(BAD_TOPIC, frame_bytes(draw(images)) + draw(st.binary(min_size=1, max_size=64)), "payload_size")


@st.composite
def lying_length(draw) -> Case:
    lie = draw(st.integers(0, 2**32 - 1).filter(lambda n: n != 784))
    return Case(BAD_TOPIC, raw_frame(payload_len=lie, pixels=draw(images).tobytes()), "payload_size")


@st.composite
def bad_header_field(draw) -> Case:
    field = draw(st.sampled_from(["magic", "version", "dtype", "ndim", "flags", "id_len", "device"]))
    if field == "magic":
        return Case(BAD_TOPIC,
                    raw_frame(magic=draw(st.binary(min_size=4, max_size=4).filter(lambda m: m != wire.MAGIC))),
                    "bad_magic")
    if field == "version":
        return Case(BAD_TOPIC, raw_frame(version=draw(st.integers(0, 255).filter(lambda v: v != wire.VERSION))),
                    "unknown_version")
    if field == "dtype":
        return Case(BAD_TOPIC, raw_frame(code=draw(st.integers(0, 255).filter(lambda c: c not in wire.DTYPE_CODES))),
                    "unknown_dtype")
    if field == "ndim":
        return Case(BAD_TOPIC, raw_frame(ndim=draw(st.sampled_from([0, *range(wire.MAX_NDIM + 1, 256)]))), "bad_ndim")
    if field == "flags":
        extra = draw(st.integers(1, 255).filter(lambda f: f & ~wire.KNOWN_FLAGS))
        return Case(BAD_TOPIC, raw_frame(flags=extra), "unknown_flags")
    if field == "id_len":
        return Case(BAD_TOPIC, raw_frame(id_len=draw(st.sampled_from([0, *range(wire.MAX_DEVICE_ID_LEN + 1, 256)]))),
                    "bad_device_id")
    device = draw(st.binary(min_size=1, max_size=wire.MAX_DEVICE_ID_LEN).filter(
        lambda b: not wire.DEVICE_ID_RE.fullmatch(b.decode("ascii", errors="replace"))))
    return Case(BAD_TOPIC, raw_frame(device=device), "bad_device_id")


@st.composite
def absurd_shape(draw) -> Case:
    ndim = draw(st.integers(1, wire.MAX_NDIM))
    limits = wire.DecodeLimits()
    dims = draw(st.lists(st.integers(1, limits.max_dim), min_size=ndim, max_size=ndim))
    how = draw(st.sampled_from(["zero", "too_long", "too_many"]))
    i = draw(st.integers(0, ndim - 1))
    if how == "zero":
        dims[i] = 0
    elif how == "too_long":
        dims[i] = draw(st.integers(limits.max_dim + 1, 2**32 - 1))
    elif math.prod(dims) <= limits.max_elements:
        dims = [limits.max_dim] * max(ndim, 2) if ndim >= 2 else [limits.max_dim + 1]
    payload_len = draw(st.integers(0, 2**32 - 1))  # any claim: the shape is refused before the size is read
    return Case(BAD_TOPIC, raw_frame(shape=tuple(dims), payload_len=payload_len, pixels=b"\0" * 16), "shape_limit")


@st.composite
def wrong_dtype(draw) -> Case:
    dtype = draw(st.sampled_from([np.dtype("<u2"), np.dtype("i1")]))
    px = draw(images).astype(dtype)
    return Case(BAD_TOPIC, frame_bytes(px), "unsupported_dtype")


def _float_frame(draw, dtype: np.dtype) -> np.ndarray:
    return (draw(images) / 255.0).astype(dtype)


@st.composite
def non_finite(draw) -> Case:
    px = _float_frame(draw, draw(st.sampled_from([np.dtype("<f4"), np.dtype("<f2")])))
    where = draw(st.lists(st.integers(0, px.size - 1), min_size=1, max_size=20))
    px.flat[where] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return Case(BAD_TOPIC, frame_bytes(px), "non_finite")


@st.composite
def out_of_range(draw) -> Case:
    dtype = draw(st.sampled_from([np.dtype("<f4"), np.dtype("<f2")]))
    px = _float_frame(draw, dtype)
    value = draw(st.floats(1.01, 6e4) | st.floats(-6e4, -0.01))
    px.flat[draw(st.integers(0, px.size - 1))] = value
    return Case(BAD_TOPIC, frame_bytes(px), "out_of_range")


@st.composite
def wrong_shape(draw) -> Case:
    shape = draw(st.lists(st.integers(1, 64), min_size=1, max_size=4).map(tuple).filter(
        lambda s: s not in ((28, 28), (1, 28, 28)) and math.prod(s) <= 1 << 16))  # under DecodeLimits
    code = draw(st.sampled_from([1, 3]))  # uint8 or float32 in [0, 1]: only the shape is wrong
    px = np.zeros(shape, dtype=wire.DTYPE_CODES[code])
    return Case(BAD_TOPIC, frame_bytes(px), "wrong_shape")


topic_level = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Cn"), blacklist_characters="/+#"),
                      max_size=80)


@st.composite
def topic_mismatch(draw) -> Case:
    level = draw(topic_level.filter(lambda t: t != BAD_DEVICE))
    return Case(f"{topics.PREFIX}/frames/{level}", frame_bytes(draw(images)), "topic_mismatch")


@st.composite
def odd_topic(draw) -> Case:
    """Frames on topics edgeq/v1/frames/+ does not match: never delivered to the edge."""
    level = draw(topic_level)
    topic = draw(st.sampled_from([
        f"{topics.PREFIX}/frames/{BAD_DEVICE}/{level}", f"{topics.PREFIX}/frames", f"{topics.PREFIX}/framesx/{level}",
        f"edgeq/v2/frames/{BAD_DEVICE}", f"/{topics.PREFIX}/frames/{BAD_DEVICE}",
    ]))
    return Case(topic, frame_bytes(draw(images)), UNDELIVERABLE)


hostile = st.one_of(random_bytes(), st.just(Case(BAD_TOPIC, b"", "short_header")), truncated(), trailing_bytes(),
                    lying_length(), bad_header_field(), absurd_shape(), wrong_dtype(), non_finite(), out_of_range(),
                    wrong_shape(), topic_mismatch(), odd_topic())


# ------------------------------------------------------------------ the generator checks itself, without MQTT


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile)
def test_each_hostile_payload_is_rejected_for_the_reason_it_was_made_for(case: Case) -> None:
    """The edge's own checks (decode_frame, then frame_pixels) give exactly the generator's reason."""
    if case.reason == UNDELIVERABLE:
        return
    try:
        frame_pixels(decode_frame(Received(case.topic, case.payload, 0)), (28, 28))
    except (FrameDecodeError, FrameRejected) as err:
        assert case.reason is None or err.reason == case.reason, (case, err)
        return
    pytest.fail(f"accepted a hostile payload: {case!r}")


def test_shape_products_do_not_wrap_around_with_generous_limits() -> None:
    """Found reviewing the decoder for this fuzz: with limits above the defaults, the element count
    overflowed int64 (4 dims of 2**32-1), so the frame was refused as payload_size "needs -17179869183 bytes"."""
    data = raw_frame(shape=(2**32 - 1,) * 4, pixels=b"")
    with pytest.raises(FrameDecodeError) as err:
        wire.decode(data, wire.DecodeLimits(max_elements=2**40, max_dim=2**32))
    assert err.value.reason == "shape_limit", err.value


# ------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def hostile_pipeline():
    """A broker, a local Ray, one edge worker actor (edge-only: no cloud needed), a results collector."""
    import ray

    with MosquittoBroker() as broker:
        cfg = mqttlib.MqttConfig(host=broker.host, port=broker.port)
        started = cluster.connect(RayConfig(num_cpus=2), edge_actors=1)
        edge = None
        collector = ResultCollector(cfg, "hostile-collector").start()
        try:
            edge = cluster.start_edge(EdgeConfig(actors=1, policy="edge-only", metrics_port=0, group="edgeq-hostile"),
                                      cfg, RayConfig(namespace="test-hostile"), [])
            sender = mqttlib.make_client(cfg, "hostile-sender")
            connected = threading.Event()
            sender.on_connect = lambda c, u, f, rc, p: rc.is_failure or connected.set()
            mqttlib.start(sender, cfg)
            assert connected.wait(30), "test sender could not connect"
            yield cfg, edge.handles[0], sender, collector
            sender.disconnect()
            sender.loop_stop()
        finally:
            collector.stop()
            if edge is not None:
                cluster.stop_tier(edge)
            if started:
                ray.shutdown()


class Sent:
    """What was published so far, and the worker's counters when the last check passed."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.bad = self.good = self.undetermined = 0
        self.stats: dict = {}


def publish_all(sender: mqtt.Client, messages: list[tuple[str, bytes]]) -> None:
    infos = [sender.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(30)
        assert info.is_published()


def good_frame(n: int, dtype: str = "u1") -> tuple[str, bytes]:
    device = f"good{n % 4}"
    i = n % len(MNIST)
    px = MNIST.images[i] if dtype == "u1" else (MNIST.images[i] / 255.0).astype(dtype)
    return topics.frames(device), frame_bytes(px, device, seq=n, label=int(MNIST.labels[i]))


def check_worker(edge, collector, sent: Sent, timeout: float = 60.0) -> dict:
    """Wait until every good frame so far is answered (bounded), then compare the worker's counters."""
    import ray

    assert collector.wait_for(sent.good, timeout), f"{collector.answered()} of {sent.good} good frames answered"
    stats = ray.get(edge.stats.remote(), timeout=30)
    rejected = {k.split(".", 1)[1]: v for k, v in stats.items() if k.startswith("rejected.")}
    assert stats.get("batch_errors", 0) == 0, stats
    assert stats["received"] == sent.good + sent.bad - sent.reasons[UNDELIVERABLE], stats
    assert sum(rejected.values()) == sent.bad - sent.reasons[UNDELIVERABLE], (rejected, sent.reasons)
    for reason, n in sent.reasons.items():
        if reason != UNDELIVERABLE:
            assert n <= rejected.get(reason, 0) <= n + sent.undetermined, (reason, rejected, sent.reasons)
    sent.stats = stats
    return rejected


def test_10000_hostile_payloads_are_counted_by_reason_and_never_stop_the_worker(hostile_pipeline) -> None:
    _, edge, sender, collector = hostile_pipeline
    sent = Sent()
    t0 = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one_burst(data) -> None:
        cases = data.draw(st.lists(hostile, min_size=CASES[0], max_size=CASES[1]), label="hostile payloads")
        messages = []
        for case in cases:
            messages.append((case.topic, case.payload))
            if len(messages) % 10 == 0:  # interleave valid frames: uint8, and float32/float16 in [0, 1]
                messages.append(good_frame(sent.good, ("u1", "<f4", "<f2")[sent.good % 3]))
                sent.good += 1
            sent.bad += 1
            sent.reasons[case.reason or "?"] += 1
            sent.undetermined += case.reason is None
        messages.append(good_frame(sent.good))  # last: once it is answered, everything before it was handled
        sent.good += 1
        publish_all(sender, messages)
        check_worker(edge, collector, sent)

    one_burst()
    rejected = check_worker(edge, collector, sent)
    seconds = time.monotonic() - t0
    delivered = sent.bad - sent.reasons[UNDELIVERABLE]
    print(f"\n{sent.bad} hostile payloads ({delivered} on topics the edge subscribes to) + {sent.good} valid frames "
          f"in {seconds:.0f} s; worker alive, {sent.stats.get('batch_errors', 0)} batch errors, "
          f"all {sent.good} valid frames answered")
    print(f"{'reason':<18}{'generated':>10}{'counted':>9}")
    for reason in sorted(set(sent.reasons) | set(rejected)):
        shown = "(not delivered)" if reason == UNDELIVERABLE else rejected.get(reason, 0)
        print(f"{reason:<18}{sent.reasons.get(reason, 0):>10}{shown!s:>9}")
    assert delivered >= 10_000
    assert collector.stats.bad_messages == 0
    assert len(collector.stats.unique) == sent.good


def test_oversized_frames_are_rejected_and_over_the_packet_limit_never_reach_the_worker(hostile_pipeline) -> None:
    """Frames as large as the decoder allows (4 MiB uint8, 16 MiB float32) are counted as wrong_shape;
    a packet over the broker's max_packet_size (infra/mosquitto/dev.conf) is refused by Mosquitto,
    which disconnects the sender, so it never reaches the edge."""
    import ray

    cfg, edge, sender, collector = hostile_pipeline
    before = ray.get(edge.stats.remote(), timeout=30)
    big = [frame_bytes(np.zeros((2048, 2048), np.uint8)), frame_bytes(np.zeros((2048, 2048), np.float32)),
           raw_frame(shape=(2049, 2048), pixels=b"")]
    publish_all(sender, [(BAD_TOPIC, payload) for payload in big])

    rogue = mqttlib.make_client(cfg, "hostile-rogue")
    gone = threading.Event()
    rogue.on_disconnect = lambda *args: gone.set()
    rogue.connect(cfg.host, cfg.port)
    rogue.loop_start()
    try:
        rogue.publish(BAD_TOPIC, bytes(16_842_752 + 1), qos=1)  # one byte over max_packet_size (payload alone)
        assert gone.wait(30), "the broker kept a client that sent a packet over max_packet_size"
    finally:
        rogue.loop_stop()

    answered = collector.answered()
    publish_all(sender, [good_frame(10**6)])  # handled after the big ones: same connection, same order
    assert collector.wait_for(answered + 1, 60)
    after = ray.get(edge.stats.remote(), timeout=30)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if isinstance(after[k], int)}
    print(f"\noversized: {delta.get('rejected.wrong_shape', 0)} wrong_shape, {delta.get('rejected.shape_limit', 0)} "
          f"shape_limit, {delta['received']} received in all, rogue sender disconnected by the broker")
    assert delta["received"] == 4
    assert delta.get("rejected.wrong_shape", 0) == 2 and delta.get("rejected.shape_limit", 0) == 1
    assert delta.get("batch_errors", 0) == 0
