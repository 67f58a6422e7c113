"""The whole pipeline against real Mosquitto and a local Ray: devices -> edge actors -> cloud actors -> results.

Counters are read the way a user reads them: over HTTP from the workers'
metrics endpoints, and through a real Prometheus server.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import urllib.request
from collections import Counter

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_workers.config import CloudConfig, RayConfig
from edge_workers.config import EdgeConfig
from infra import cluster
from infra.collector import ResultCollector
from infra.prometheus_server import PrometheusServer
from publishers import topics, wire
from publishers.config import PublishConfig
from publishers.run import publish
from tests.conftest import DATA_DIR, REPO


def scrape(targets: list[str]) -> Counter:
    """Sum every sample over the metrics endpoints: {(name, sorted labels): value}."""
    total: Counter = Counter()
    for target in targets:
        text = urllib.request.urlopen(f"http://{target}/metrics", timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                total[(s.name, tuple(sorted(s.labels.items())))] += s.value
    return total


def value(samples: Counter, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@dataclasses.dataclass
class Pipeline:
    mqtt_cfg: object
    edge: cluster.Tier
    cloud: cluster.Tier

    @property
    def targets(self) -> list[str]:
        return self.edge.metrics_targets() + self.cloud.metrics_targets()


@pytest.fixture
def pipeline(local_ray, broker, mqtt_cfg, request):
    """Cloud + edge tiers in a namespace of their own; `request.param` overrides EdgeConfig fields."""
    ns = f"test-{request.node.name}".replace("[", "-").replace("]", "")[:60]
    ray_cfg = RayConfig(namespace=ns)
    overrides = dict(getattr(request, "param", {}))
    cloud = cluster.start_cloud(CloudConfig(actors=overrides.pop("cloud_actors", 1), metrics_port=0), ray_cfg)
    edge = None
    try:
        edge = cluster.start_edge(EdgeConfig(actors=2, metrics_port=0, **overrides), mqtt_cfg, ray_cfg, cloud.names)
        yield Pipeline(mqtt_cfg, edge, cloud)
    finally:
        if edge is not None:
            cluster.stop_tier(edge)
        cluster.stop_tier(cloud)


def run_frames(p: Pipeline, pub: PublishConfig, timeout: float = 90.0):
    collector = ResultCollector(p.mqtt_cfg, "test-results").start()
    try:
        report = publish(p.mqtt_cfg, pub)
        answered = collector.wait_for(report.total("acked"), timeout)
        assert answered, f"only {collector.answered()} of {report.total('acked')} frames answered in {timeout}s"
        time.sleep(0.5)  # let any duplicate answers arrive before counting
    finally:
        answers = collector.stop()
    return report, answers


def test_2000_noisy_frames_from_4_devices_all_answered_by_both_tiers(pipeline: Pipeline) -> None:
    pub = PublishConfig(devices=4, count=500, rate_hz=0, noise="gaussian", noise_level=0.2, data_dir=str(DATA_DIR))
    report, answers = run_frames(pipeline, pub)

    assert report.total("acked") == 2000
    assert len(answers.unique) == 2000 and answers.result_count == 2000  # exactly one answer per frame
    # One message per device per answered group: frames published as fast as possible share messages
    # (observed 170 messages for the 2000 results).
    assert answers.duplicates == 0 and answers.messages < 2000
    assert answers.bad_messages == 0
    assert answers.accuracy >= 0.97, answers.accuracy  # observed 0.99
    assert answers.tiers["edge"] > 0 and answers.tiers["cloud"] > 0, answers.tiers  # observed ~1900 / ~90
    assert answers.degraded == 0

    m = scrape(pipeline.targets)
    assert value(m, "edgeq_frames_received_total") == 2000
    assert value(m, "edgeq_payload_bytes_total", direction="device_to_edge") == report.total("bytes_sent")
    assert value(m, "edgeq_results_total", tier="edge") == answers.tiers["edge"]
    assert value(m, "edgeq_results_total", tier="cloud") == answers.tiers["cloud"]
    assert value(m, "edgeq_payload_bytes_total", direction="edge_to_device") == answers.bytes
    # The uplink: what the edges counted as sent is what the cloud counted as received, 784 B per frame.
    up = value(m, "edgeq_payload_bytes_total", direction="edge_to_cloud")
    assert up == value(m, "edgeq_cloud_received_bytes_total") == 784 * answers.tiers["cloud"]
    correct = value(m, "edgeq_predictions_total", outcome="correct")
    assert correct == answers.correct
    assert value(m, "edgeq_decode_errors_total") == 0
    # Cloud-tier answers went straight from the cloud actor to the devices (issue 17), none through the edge.
    import ray

    edge_stats = ray.get([h.stats.remote() for h in pipeline.edge.handles], timeout=30)
    cloud_stats = ray.get([h.stats.remote() for h in pipeline.cloud.handles], timeout=30)
    assert sum(st.get("results.published_by_cloud", 0) for st in edge_stats) == answers.tiers["cloud"]
    assert sum(st.get("answers_published", 0) for st in cloud_stats) == answers.tiers["cloud"]


@pytest.mark.parametrize("pipeline", [{"policy": "edge-only"}], indirect=True)
def test_edge_only_policy_never_calls_the_cloud(pipeline: Pipeline) -> None:
    pub = PublishConfig(devices=2, count=100, rate_hz=0, noise="gaussian", data_dir=str(DATA_DIR))
    report, answers = run_frames(pipeline, pub)
    assert len(answers.unique) == 200 and answers.tiers == {"edge": 200}
    m = scrape(pipeline.targets)
    assert value(m, "edgeq_payload_bytes_total", direction="edge_to_cloud") == 0
    assert value(m, "edgeq_cloud_frames_total") == 0


@pytest.mark.parametrize("pipeline", [{"policy": "cloud-only", "codec": "pca-int8"}], indirect=True)
def test_cloud_only_policy_with_pca_int8_sends_64_bytes_per_frame(pipeline: Pipeline) -> None:
    pub = PublishConfig(devices=2, count=100, rate_hz=0, data_dir=str(DATA_DIR))
    report, answers = run_frames(pipeline, pub)
    assert len(answers.unique) == 200 and answers.tiers == {"cloud": 200}
    assert answers.accuracy >= 0.93, answers.accuracy  # the PCA MLP on clean frames; observed ~0.97
    m = scrape(pipeline.targets)
    assert value(m, "edgeq_payload_bytes_total", direction="edge_to_cloud") == 200 * 64
    assert value(m, "edgeq_cloud_frames_total", codec="pca-int8") == 200


def _bad_payloads() -> list[tuple[str, bytes, str]]:
    """(topic, payload, expected reason) for frames the edge must reject."""
    ok = wire.Frame("bad0", 0, time.time_ns(), np.zeros((28, 28), np.uint8), label=1)
    good = wire.encode(ok)
    nan = wire.encode(dataclasses.replace(ok, seq=1, pixels=np.full((28, 28), np.nan, np.float32)))
    shape = wire.encode(dataclasses.replace(ok, seq=2, pixels=np.zeros((32, 32), np.uint8)))
    return [
        (topics.frames("bad0"), b"not a frame at all, but long enough for a header", "bad_magic"),
        (topics.frames("bad0"), good[:-100], "payload_size"),
        (topics.frames("other"), good, "topic_mismatch"),
        (topics.frames("bad0"), nan, "non_finite"),
        (topics.frames("bad0"), shape, "wrong_shape"),
    ]


def test_bad_frames_are_counted_by_reason_and_good_ones_still_answered(pipeline: Pipeline) -> None:
    bad = _bad_payloads()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-bad-sender")
    client.connect(pipeline.mqtt_cfg.host, pipeline.mqtt_cfg.port)
    client.loop_start()
    def send_bad() -> None:
        for i in range(40):  # interleaved with the good frames; all 40 are sent
            topic, payload, _ = bad[i % len(bad)]
            client.publish(topic, payload, qos=1).wait_for_publish(5)
            time.sleep(0.01)

    sender = threading.Thread(target=send_bad)
    sender.start()
    try:
        pub = PublishConfig(devices=2, count=100, rate_hz=100, data_dir=str(DATA_DIR))
        report, answers = run_frames(pipeline, pub)
    finally:
        sender.join()
        client.loop_stop()
        client.disconnect()
    assert len(answers.unique) == 200 == report.total("acked")
    deadline = time.monotonic() + 30  # the last bad frames may still be in an edge queue
    while value(m := scrape(pipeline.targets), "edgeq_frames_received_total") < 240 and time.monotonic() < deadline:
        time.sleep(0.2)
    for _, _, reason in bad:
        assert value(m, "edgeq_decode_errors_total", reason=reason) == 8, reason
    assert value(m, "edgeq_frames_received_total") == 240


def test_prometheus_finds_the_workers_metrics(pipeline: Pipeline) -> None:
    pub = PublishConfig(devices=2, count=60, rate_hz=0, noise="gaussian", data_dir=str(DATA_DIR))
    report, answers = run_frames(pipeline, pub)
    assert len(answers.unique) == 120
    with PrometheusServer(config=REPO / "infra" / "prometheus" / "prometheus.yml") as prom:
        prom.set_targets(pipeline.targets, {"deployment": "test"})
        # All three endpoints (2 edge, 1 cloud) scraped and healthy.
        prom.wait_for('sum(up{job="edgeq"})', lambda r: r and float(r[0]["value"][1]) == 3, timeout=60)
        frames = prom.wait_for("sum(edgeq_frames_received_total)", lambda r: r and float(r[0]["value"][1]) == 120,
                               timeout=60)
        assert float(frames[0]["value"][1]) == 120
        sent = prom.query('sum(edgeq_payload_bytes_total{direction="device_to_edge"})')
        assert float(sent[0]["value"][1]) == report.total("bytes_sent")
        by_tier = prom.query("sum by (tier) (edgeq_results_total)")
        assert sum(float(r["value"][1]) for r in by_tier) == 120
        cloud = prom.query('sum(edgeq_cloud_frames_total) or vector(0)')
        assert float(cloud[0]["value"][1]) == answers.tiers["cloud"]


@pytest.mark.parametrize("pipeline", [{"policy": "cloud-only"}], indirect=True)
def test_dead_cloud_worker_means_degraded_edge_answers_not_lost_frames(pipeline: Pipeline) -> None:
    import ray

    ray.kill(pipeline.cloud.handles[0])
    pub = PublishConfig(devices=2, count=50, rate_hz=0, data_dir=str(DATA_DIR))
    report, answers = run_frames(pipeline, pub)
    assert len(answers.unique) == 100 == report.total("acked")
    assert answers.tiers == {"edge": 100} and answers.degraded == 100
    assert answers.accuracy >= 0.95  # the edge model answers instead; observed ~0.99
    m = scrape(pipeline.edge.metrics_targets())
    assert value(m, "edgeq_results_total", tier="edge", degraded="true") == 100
    assert value(m, "edgeq_cloud_requests_total", outcome="error") >= 1


@pytest.mark.parametrize("pipeline", [{"policy": "cloud-only", "cloud_timeout_s": 0.001}], indirect=True)
def test_cloud_calls_past_their_deadline_are_answered_degraded_at_the_edge(pipeline: Pipeline) -> None:
    pub = PublishConfig(devices=2, count=50, rate_hz=0, data_dir=str(DATA_DIR))
    report, answers = run_frames(pipeline, pub)
    assert len(answers.unique) == 100 == answers.result_count  # a late cloud answer is dropped, not published twice
    m = scrape(pipeline.edge.metrics_targets())
    timeouts = value(m, "edgeq_cloud_requests_total", outcome="timeout")
    assert timeouts >= 1
    assert answers.degraded == value(m, "edgeq_results_total", degraded="true") >= 1


def test_worker_start_failures_are_one_clear_error(local_ray, mqtt_cfg) -> None:
    import socket

    from infra.cluster import WorkerStartError
    from publishers.errors import ConfigError

    ray_cfg = RayConfig(namespace="start-errors")
    with pytest.raises(ConfigError, match="model file.*not found.*nope.onnx"):
        cluster.start_edge(EdgeConfig(model="nope.onnx"), mqtt_cfg, ray_cfg, [])
    with pytest.raises(ConfigError, match="edge.runtime must be one of"):
        cluster.start_edge(EdgeConfig(runtime="tflite"), mqtt_cfg, ray_cfg, [])
    with pytest.raises(ConfigError, match="needs cloud workers and none were found"):
        cluster.start_edge(EdgeConfig(), mqtt_cfg, ray_cfg, [])
    with socket.socket() as busy:  # a metrics port somebody else holds
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(WorkerStartError, match=f"cannot serve metrics on 127.0.0.1:{port}.*in use"):
            cluster.start_cloud(CloudConfig(actors=1, metrics_port=port), ray_cfg)


@pytest.mark.parametrize("pipeline", [{"policy": "cloud-only", "cloud_actors": 2}], indirect=True)
def test_a_call_to_a_dead_cloud_worker_is_retried_on_the_other(pipeline: Pipeline) -> None:
    import ray

    ray.kill(pipeline.cloud.handles[0])
    pub = PublishConfig(devices=2, count=50, rate_hz=0, data_dir=str(DATA_DIR))
    report, answers = run_frames(pipeline, pub)
    assert len(answers.unique) == 100 == answers.result_count
    assert answers.tiers == {"cloud": 100} and answers.degraded == 0  # every failed call went to the live one
    m = scrape(pipeline.edge.metrics_targets())
    assert value(m, "edgeq_cloud_requests_total", outcome="error") >= 1


def test_stopping_an_edge_worker_answers_what_it_received(pipeline: Pipeline) -> None:
    """Stop the workers right after the devices finish: every frame is answered or counted as a shutdown drop."""
    collector = ResultCollector(pipeline.mqtt_cfg, "stop-results").start()
    try:
        report = publish(pipeline.mqtt_cfg, PublishConfig(devices=2, count=150, rate_hz=0, noise="gaussian",
                                                          data_dir=str(DATA_DIR)))
        stats = cluster.stop_tier(pipeline.edge, "stop")
        time.sleep(0.5)
    finally:
        answers = collector.stop()
    received = sum(st["received"] for st in stats)
    dropped = sum(st.get("dropped.shutdown", 0) for st in stats)
    assert received == report.total("acked") == 300
    assert len(answers.unique) + dropped == 300 and dropped == 0  # observed: all answered within the drain
