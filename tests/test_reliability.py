"""At-least-once delivery and faults survived, against real Mosquitto and a local Ray (docs/reliability.md).

Each test prints its figures (through capsys.disabled(), so they show without -s).
"""

from __future__ import annotations

import dataclasses
import time

import paho.mqtt.client as mqtt
import pytest

from cloud_workers.config import CloudConfig, RayConfig
from edge_workers.config import EdgeConfig
from edge_workers.ingest import DrivenSubscriber, Subscriber
from infra import cluster
from infra.bench.loadgen import PublisherPool
from infra.chaos import ChaosConfig, RssSampler, broker_pid, process_rss, run_chaos
from infra.collector import ResultCollector
from publishers import topics
from publishers.config import PublishConfig
from publishers.run import build_devices, run_devices
from tests.conftest import DATA_DIR, collect


def show(capsys, *lines: str) -> None:
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def _publisher(mqtt_cfg, client_id: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect(mqtt_cfg.host, mqtt_cfg.port)
    client.loop_start()
    return client


@pytest.mark.parametrize("kind", [Subscriber, DrivenSubscriber])
def test_unacked_frames_come_back_to_the_same_client_id_and_acked_ones_do_not(broker, mqtt_cfg, kind) -> None:
    """The mechanism the edge relies on: manual ack + persistent session (Mosquitto 2.0.11, MQTT 3.1.1),
    with paho's network thread and with the I/O driven by the consumer (the edge worker's way)."""
    group = topics.shared(topics.FRAMES_FILTER, "g")
    sub = kind(mqtt_cfg, "member-0", group, persistent=True, manual_ack=True).start()
    deadline = time.monotonic() + 10
    while not sub.subacks and time.monotonic() < deadline:  # a DrivenSubscriber connects inside get_batch
        sub.get_batch(1, 0.05)
    assert sub.subacks
    pub = _publisher(mqtt_cfg, "ack-pub")
    try:
        for i in range(10):
            pub.publish(topics.frames("d0"), f"m{i}".encode(), qos=1).wait_for_publish(5)
        first = collect(sub, 10, timeout=10)
        for msg in first[:4]:
            sub.ack(msg)
        time.sleep(0.3)  # the PUBACKs leave before the connection drops
        sub._client.socket().close()  # a crash: no DISCONNECT packet, the session stays
        sub._client.loop_stop()
        sub = kind(mqtt_cfg, "member-0", group, persistent=True, manual_ack=True).start()
        again = collect(sub, 10, timeout=10)
        assert [m.payload for m in first] == [f"m{i}".encode() for i in range(10)]
        assert sorted(m.payload for m in again) == [f"m{i}".encode() for i in range(4, 10)]  # only the unacked
        for msg in again:
            sub.ack(msg)
    finally:
        sub.stop()
        pub.loop_stop()
        pub.disconnect()


def test_a_device_resends_frames_whose_result_does_not_come(broker, mqtt_cfg) -> None:
    """End-to-end at-least-once at the device: an answerer that ignores each frame's first copy still answers all."""
    import threading

    from edge_workers.ingest import decode_frame
    from publishers import results

    answerer = Subscriber(mqtt_cfg, "answerer", topics.FRAMES_FILTER, persistent=True).start()
    answerer.wait_subscribed()
    seen: set[tuple[str, int]] = set()
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            for msg in answerer.get_batch(100, 0.05):
                f = decode_frame(msg)
                if (f.device_id, f.seq) in seen:
                    answerer.publish(topics.results(f.device_id),
                                     results.encode(results.Result(f.device_id, f.seq, 0, 1.0, "edge")))
                seen.add((f.device_id, f.seq))

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        cfg = PublishConfig(devices=2, count=50, rate_hz=100, data_dir=str(DATA_DIR), resend_after_s=0.5,
                            queue_size=20)
        report = run_devices(build_devices(mqtt_cfg, cfg))
    finally:
        stop.set()
        thread.join(timeout=10)
        answerer.stop()
    assert report.total("answered") == 100 and report.total("resent") >= 100  # each frame went out twice
    assert report.dropped == {}  # the window of unanswered frames (queue_size 20) paused the source instead
    assert len(seen) == 100


def test_5000_frames_through_two_broker_restarts_an_edge_kill_and_a_cloud_kill(
        local_ray, broker, mqtt_cfg, capsys) -> None:
    ray_cfg = RayConfig(namespace="reliability-chaos")
    cloud = cluster.start_cloud(CloudConfig(actors=2, metrics_port=0), ray_cfg)
    edge = None
    try:
        edge = cluster.start_edge(EdgeConfig(actors=2, metrics_port=0), mqtt_cfg, ray_cfg, cloud.names)
        cfg = ChaosConfig(devices=4, frames_per_device=1250, rate_hz=60, broker_restarts=2, broker_down_s=2.0,
                          edge_kills=1, cloud_kills=1, data_dir=str(DATA_DIR))
        report = run_chaos(cfg, broker, mqtt_cfg, edge, cloud)
    finally:
        if edge is not None:
            cluster.stop_tier(edge)
        cluster.stop_tier(cloud)
    show(capsys, *report.lines())
    assert [f.what for f in report.faults] == ["broker", "edge", "cloud", "broker"]
    assert all(f.recovered_s is not None for f in report.faults), report.faults  # every component came back
    assert report.sent == 5000 and report.publish.dropped == {}
    assert len(report.answers.unique) == 5000 and report.lost == 0, report.missing[:10]
    assert report.answers.bad_messages == 0
    assert report.answers.accuracy >= 0.97  # noisy frames; observed ~0.99
    # Every result is either a first answer or a recognised duplicate of one.
    assert report.answers.result_count == 5000 + report.answers.duplicates


def _rates(collector: ResultCollector, prefix: str) -> int:
    with collector._lock:
        return sum(1 for (device, _) in collector.stats.unique if device.startswith(prefix))


def _pub_cfg(prefix: str, devices: int, rate_hz: float, seconds: float) -> PublishConfig:
    return PublishConfig(devices=devices, count=0, duration_s=seconds, rate_hz=rate_hz, data_dir=str(DATA_DIR),
                         device_prefix=prefix, drop_policy="drop-oldest", queue_size=100)


def _phase(mqtt_cfg, prefix: str, devices: int, rate_hz: float, seconds: float):
    return run_devices(build_devices(mqtt_cfg, _pub_cfg(prefix, devices, rate_hz, seconds)))


def _edge_drops(edge: cluster.Tier) -> dict[str, int]:
    import ray

    stats = ray.get([h.stats.remote() for h in edge.handles], timeout=30)
    out: dict[str, int] = {}
    for st in stats:
        for k, v in st.items():
            if k.startswith(("dropped.", "received")):
                out[k] = out.get(k, 0) + v
    return out


def _wait_settled(collector: ResultCollector, edge: cluster.Tier, timeout: float = 60.0) -> None:
    """Until the edge's queue is empty and no new answers came for a second (bounded)."""
    import ray

    deadline, last = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        depth = sum(s["queue_depth"] for s in ray.get([h.stats.remote() for h in edge.handles], timeout=30))
        now = collector.answered()
        if depth == 0 and now == last:
            return
        last = now
        time.sleep(1.0)


def test_qos0_overload_at_3x_capacity_sheds_oldest_frames_counted_and_recovers(
        local_ray, broker, mqtt_cfg, capsys) -> None:
    """QoS 0: the edge's bounded queue drops its OLDEST frames (counted `queue_full`); memory stays bounded."""
    qos0 = dataclasses.replace(mqtt_cfg, qos=0)
    ray_cfg = RayConfig(namespace="reliability-overload")
    queue_size = 1000
    # One frame per batch keeps the edge's capacity low (about 1,400 frames/s here). The overload comes from two
    # publisher processes: in this process the devices shared one core with the result collector and reached
    # only 1.9x capacity (CI, 2,640 frames/s).
    edge = cluster.start_edge(EdgeConfig(actors=1, metrics_port=0, policy="edge-only", queue_size=queue_size,
                                         batch_max=1), qos0, ray_cfg, [])
    collector = ResultCollector(qos0, "overload-results").start()
    pool = None
    try:
        pool = PublisherPool(qos0, _pub_cfg("over", 4, 0, 30.0), processes=2)
        # 1. Capacity: what the edge answers per second while saturated, offered 2,000 frames/s and doubling
        # until it does not keep up. Not a flood: at QoS 0 the edge reads (and sheds) everything it is sent,
        # and paho reads a packet with 3-4 recv calls, so a flood of ~20,000 frames/s from unpaced devices
        # took most of its CPU (answered 514/s, against 1,748/s with edgeq's own packet reader before issue 17).
        flood, capacity = None, 0.0
        for step, rate in enumerate((2000, 4000, 8000)):
            t0 = time.monotonic()
            flood = pool.run(f"cap{step}-", rate, 5.0)
            _wait_settled(collector, edge)
            capacity = _rates(collector, f"cap{step}-") / max(time.monotonic() - t0 - 1.0, 1.0)
            if capacity < 0.8 * flood.sent / 5.0:
                break
        baseline = _edge_drops(edge)
        # 2. Overload: 3x capacity for 30 s, RSS sampled twice a second.
        with RssSampler(broker, edge) as rss:
            rss_before = process_rss(broker_pid(broker))
            over = pool.run("over", 3 * capacity, 30.0)
            _wait_settled(collector, edge)
        after_over = _edge_drops(edge)
        # 3. Normal load (half of capacity) for 10 s: every frame answered, none dropped.
        normal = _phase(qos0, "norm", 2, capacity / 4, 10.0)
        _wait_settled(collector, edge)
        final = _edge_drops(edge)
    finally:
        if pool is not None:
            pool.close()
        collector.stop()
        cluster.stop_tier(edge)
    over_sent, over_answered = over.sent, _rates(collector, "over")
    shed = after_over.get("dropped.queue_full", 0) - baseline.get("dropped.queue_full", 0)
    received = after_over.get("received", 0) - baseline.get("received", 0)
    norm_sent, norm_answered = normal.total("sent"), _rates(collector, "norm")
    show(capsys,
         f"overload: capacity {capacity:.0f} frames/s (offered {flood.sent / 5.0:.0f}/s, QoS 0, 1 edge actor)",
         f"overload: offered {over_sent} frames in {over.seconds:.1f}s = {over_sent / over.seconds:.0f}/s "
         f"({over_sent / over.seconds / capacity:.1f}x capacity); answered {over_answered}, shed at the edge "
         f"{shed} (queue_full, oldest first), device drops {over.dropped or 'none'}, unaccounted "
         f"{over_sent - received - shed}",
         f"overload: rss max edge {rss.edge_max / 2**20:.0f} MiB, broker {rss.broker_max / 2**20:.0f} MiB "
         f"(broker before {rss_before / 2**20:.0f} MiB)",
         f"overload: afterwards at {norm_sent / normal.seconds:.0f}/s: answered {norm_answered} of {norm_sent}, "
         f"new drops {final.get('dropped.queue_full', 0) - after_over.get('dropped.queue_full', 0)}")
    assert over_sent / over.seconds >= 2.0 * capacity  # the publishers really overloaded the edge
    # Every frame offered is accounted for: answered, or shed at the edge and counted (observed: 0 unseen).
    assert shed > 0 and over_answered == received and received + shed == over_sent
    # Shedding did not stall the edge: it answered 48-82 % of the flood's capacity during the overload, the
    # publisher processes taking CPU from it on 2 cores (docs/reliability.md); a stall would show near 0.
    assert over_answered >= 0.3 * capacity * 30
    assert rss.edge_max < 1024 * 2**20 and rss.broker_max < 256 * 2**20  # stated bounds (docs/reliability.md)
    assert norm_answered == norm_sent  # recovered: no drops at normal load
    assert final.get("dropped.queue_full", 0) == after_over.get("dropped.queue_full", 0)


def test_qos1_overload_is_held_in_bounded_queues_and_nothing_is_lost(
        local_ray, broker, mqtt_cfg, capsys) -> None:
    """QoS 1 + manual ack: when the edge's bounded queue is full its paho thread waits (TCP back-pressure), the
    backlog stays in the broker's bounded per-client queue, nothing is dropped or lost, and it is answered once
    the load falls. (Mosquitto 2.0.11 does not hold an acking client to max_inflight_messages: observed 10,000
    frames queued at the edge without this back-pressure; docs/reliability.md.)"""
    ray_cfg = RayConfig(namespace="reliability-overload-qos1")
    # One frame per batch and a small queue: the edge's own batches keep up with what the in-process publishers
    # offer (its queue peaked at 4-38 of 1,000 frames), so the bound and the back-pressure were never reached.
    queue_size = 200
    edge = cluster.start_edge(EdgeConfig(actors=1, metrics_port=0, policy="edge-only", queue_size=queue_size,
                                         batch_max=1, batch_wait_ms=0), mqtt_cfg, ray_cfg, [])
    collector = ResultCollector(mqtt_cfg, "overload1-results").start()
    try:
        t0 = time.monotonic()
        _phase(mqtt_cfg, "cap", 2, 0, 3.0)
        _wait_settled(collector, edge, timeout=120)
        capacity = _rates(collector, "cap") / max(time.monotonic() - t0 - 1.0, 1.0)
        with RssSampler(broker, edge, period_s=0.25) as rss:
            over = _phase(mqtt_cfg, "over", 8, 3 * capacity / 8, 10.0)
            t_over = time.monotonic()
            answered_all = collector.wait_for(_rates(collector, "cap") + over.total("acked"), timeout=120)
            drained_s = time.monotonic() - t_over
        drops = _edge_drops(edge)
    finally:
        collector.stop()
        cluster.stop_tier(edge)
    over_sent, over_answered = over.total("acked"), _rates(collector, "over")
    show(capsys,
         f"overload qos1: capacity {capacity:.0f} frames/s; offered {over_sent} frames in {over.seconds:.1f}s "
         f"= {over_sent / over.seconds:.0f}/s ({over_sent / over.seconds / capacity:.1f}x)",
         f"overload qos1: answered {over_answered} of {over_sent}, backlog drained {drained_s:.1f}s after the "
         f"devices stopped; edge queue max {rss.queue_max}; rss max edge {rss.edge_max / 2**20:.0f} MiB, "
         f"broker {rss.broker_max / 2**20:.0f} MiB; "
         f"drops {({k: v for k, v in drops.items() if 'dropped' in k}) or 'none'}")
    # QoS 1 publishers are held back by their own in-flight window, so they reach less than 3x here
    # (observed 1.5x on a loaded 2-core machine); the figure line shows what was offered.
    assert over_sent / over.seconds >= 1.2 * capacity
    assert answered_all and over_answered == over_sent  # nothing lost
    assert 0.8 * queue_size <= rss.queue_max <= queue_size  # the bound was reached, and held
    assert not [k for k, v in drops.items() if k.startswith("dropped.") and v]
    assert rss.edge_max < 1024 * 2**20 and rss.broker_max < 256 * 2**20
