"""Device/edge split through the workers: devices publish head tensor frames through Mosquitto, an edge actor checks
them and forwards them to a cloud actor running the tails, which answers the devices (real broker, real Ray)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cloud_workers.config import CloudConfig, RayConfig
from edge_workers.config import EdgeConfig
from infra import cluster
from infra.collector import ResultCollector
from modelstore.partition_files import write_partition
from publishers import topics, wire
from publishers.config import PublishConfig
from publishers.device import Device
from publishers.head import load_head
from publishers.run import publish, run_devices
from publishers.sources import DatasetSource
from tests.conftest import DATA_DIR, REPO
from tests.test_pipeline import scrape, value
from tests.test_split_e2e import _bad_encoder, _image_index, test_split, whole_classes  # noqa: F401 - fixtures

DEVICES, COUNT = 2, 150  # 300 head tensor frames
BAD_COUNT, PIXEL_COUNT = 60, 50


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    out = tmp_path_factory.mktemp("split_pipeline")
    write_partition(REPO / "models" / "edge_cnn.onnx", out, ["pool2"])
    return out, out / "edge_cnn.partition.json"


@pytest.fixture
def split_pipeline(local_ray, broker, mqtt_cfg, parts, request):
    """1 cloud + 1 edge actor serving the pool2 partition; `request.param` overrides EdgeConfig fields."""
    _, manifest = parts
    ray_cfg = RayConfig(namespace=f"test-split-{request.node.name}"[:60].replace("[", "-").replace("]", ""))
    cloud = cluster.start_cloud(CloudConfig(actors=1, metrics_port=0, partitions=str(manifest)), ray_cfg)
    edge = None
    try:
        edge_cfg = EdgeConfig(actors=1, metrics_port=0, partitions=str(manifest.parent),
                              **getattr(request, "param", {}))
        edge = cluster.start_edge(edge_cfg, mqtt_cfg, ray_cfg, cloud.names)
        yield edge, cloud
    finally:
        if edge is not None:
            cluster.stop_tier(edge)
        cluster.stop_tier(cloud)


def test_head_tensors_answered_by_the_cloud_tail_bad_ones_counted_pixels_still_answered(
        split_pipeline, parts, mqtt_cfg, test_split, whole_classes):  # noqa: F811 - fixtures
    edge, cloud = split_pipeline
    out, _ = parts
    collector = ResultCollector(mqtt_cfg, "test-split-results").start()
    try:
        report = publish(mqtt_cfg, PublishConfig(devices=DEVICES, count=COUNT, rate_hz=0, data_dir=str(DATA_DIR),
                                                 head=str(out / "edge_cnn@pool2.head.onnx"), tensor_codec="int8"))
        head = load_head(out / "edge_cnn@pool2.head.onnx", codec="int8")
        expected_bad, encoder = _bad_encoder(head)
        bad_cfg = PublishConfig(devices=1, count=BAD_COUNT, rate_hz=0, data_dir=str(DATA_DIR))
        bad = run_devices([Device("bad0", DatasetSource(test_split), mqtt_cfg, bad_cfg, np.random.default_rng(0),
                                  encoder=encoder, topic=topics.tensors("bad0"))])
        pixels = publish(mqtt_cfg, PublishConfig(devices=1, count=PIXEL_COUNT, rate_hz=0, data_dir=str(DATA_DIR),
                                                 device_prefix="px"))
        want = DEVICES * COUNT + BAD_COUNT - len(expected_bad) + PIXEL_COUNT
        assert collector.wait_for(want, 90), f"only {collector.answered()} of {want} frames answered"
        time.sleep(0.5)  # let any duplicate answers arrive before counting
    finally:
        answers = collector.stop()

    assert report.total("acked") == DEVICES * COUNT and bad.total("acked") == BAD_COUNT
    assert pixels.total("acked") == PIXEL_COUNT
    assert answers.duplicates == 0 and answers.bad_messages == 0
    tensor = {k: r for k, r in answers.unique.items() if k[0].startswith("dev")}
    assert set(tensor) == {(f"dev{d}", s) for d in range(DEVICES) for s in range(COUNT)}, "tensor frames lost"
    assert {r.tier for r in tensor.values()} == {"cloud"} and not any(r.degraded for r in tensor.values())
    keys = sorted(tensor)
    idx = np.array([_image_index(d, s) for d, s in keys])
    classes = np.array([tensor[k].cls for k in keys])
    labels = test_split.labels[idx]
    split_acc = 100 * float((classes == labels).mean())
    whole_acc = 100 * float((whole_classes[idx] == labels).mean())
    assert abs(split_acc - whole_acc) <= 0.3, (split_acc, whole_acc)
    # The malformed frames: rejected by reason, every good one between them answered with the whole model's class.
    bad_answers = {s: r for (d, s), r in answers.unique.items() if d == "bad0"}
    assert set(bad_answers) == set(range(BAD_COUNT)) - set(expected_bad)
    assert [r.cls for _, r in sorted(bad_answers.items())] == whole_classes[sorted(bad_answers)].tolist()
    # Old frames stay valid: the pixel frames of the same run are answered.
    assert {s for (d, s) in answers.unique if d == "px0"} == set(range(PIXEL_COUNT))

    m = scrape(edge.metrics_targets() + cloud.metrics_targets())
    assert value(m, "edgeq_decode_errors_total", reason="cut_shape") == 2
    assert value(m, "edgeq_decode_errors_total", reason="bad_scale") == 1
    assert value(m, "edgeq_decode_errors_total", reason="unknown_cut") == 2
    assert value(m, "edgeq_decode_errors_total") == 5
    assert value(m, "edgeq_frames_received_total") == DEVICES * COUNT + BAD_COUNT + PIXEL_COUNT
    tensor_bytes = report.total("bytes_sent") + bad.total("bytes_sent")
    assert value(m, "edgeq_payload_bytes_total", direction="device_to_edge") == tensor_bytes + pixels.total(
        "bytes_sent")
    # The tensor frames crossed the edge -> cloud hop as they came: exactly their bytes, counted at both ends.
    good_bad = BAD_COUNT - len(expected_bad)
    frame_bytes = report.bytes_per_frame  # "bad0" is as long as "dev0": as many bytes per frame
    assert value(m, "edgeq_cloud_frames_total", codec="tensor") == DEVICES * COUNT + good_bad
    assert value(m, "edgeq_cloud_received_bytes_total", codec="tensor") == report.total("bytes_sent") + (
        good_bad * frame_bytes)
    assert value(m, "edgeq_payload_bytes_total", direction="edge_to_cloud") == value(
        m, "edgeq_cloud_received_bytes_total")


def test_cloud_gone_the_edge_answers_tensor_frames_with_its_own_tails_degraded(
        split_pipeline, parts, mqtt_cfg, test_split, whole_classes):  # noqa: F811 - fixtures
    import ray

    edge, cloud = split_pipeline
    out, _ = parts
    for h in cloud.handles:
        ray.kill(h, no_restart=True)
    collector = ResultCollector(mqtt_cfg, "test-split-degraded").start()
    try:
        report = publish(mqtt_cfg, PublishConfig(devices=DEVICES, count=50, rate_hz=0, data_dir=str(DATA_DIR),
                                                 head=str(out / "edge_cnn@pool2.head.onnx"), tensor_codec="int8"))
        assert collector.wait_for(DEVICES * 50, 90), f"only {collector.answered()} of {DEVICES * 50} answered"
        time.sleep(0.5)
    finally:
        answers = collector.stop()

    assert report.total("acked") == DEVICES * 50
    assert len(answers.unique) == DEVICES * 50 and answers.duplicates == 0
    assert {r.tier for r in answers.unique.values()} == {"edge"} and answers.degraded == DEVICES * 50
    keys = sorted(answers.unique)
    idx = np.array([_image_index(d, s) for d, s in keys])
    classes = np.array([answers.unique[k].cls for k in keys])
    labels = test_split.labels[idx]
    split_acc, whole_acc = float((classes == labels).mean()), float((whole_classes[idx] == labels).mean())
    assert abs(split_acc - whole_acc) <= 0.01, (split_acc, whole_acc)  # at most 1 of the 100 frames
    m = scrape(edge.metrics_targets())
    assert value(m, "edgeq_results_total", tier="edge", degraded="true") == DEVICES * 50
    assert value(m, "edgeq_cloud_requests_total", outcome="error") >= 1


@pytest.mark.parametrize("split_pipeline", [{"uplink_cut": "pool2", "policy": "cloud-only"}], indirect=True)
def test_edge_head_sends_pixel_frames_up_as_tensor_frames_with_exact_bytes(split_pipeline, parts, mqtt_cfg):
    edge, cloud = split_pipeline
    out, _ = parts
    n = 200
    collector = ResultCollector(mqtt_cfg, "test-split-edge-head").start()
    try:
        report = publish(mqtt_cfg, PublishConfig(devices=DEVICES, count=n // DEVICES, rate_hz=0,
                                                 data_dir=str(DATA_DIR)))
        assert collector.wait_for(n, 90), f"only {collector.answered()} of {n} answered"
        time.sleep(0.5)
    finally:
        answers = collector.stop()

    assert report.total("acked") == n and len(answers.unique) == n and answers.duplicates == 0
    assert answers.tiers == {"cloud": n} and answers.degraded == 0
    assert answers.accuracy >= 0.97, answers.accuracy  # the edge CNN split at pool2 on denoised frames
    head = load_head(out / "edge_cnn@pool2.head.onnx", codec="int8")
    m = scrape(edge.metrics_targets() + cloud.metrics_targets())
    # One int8 tensor frame per forwarded frame, its bytes exactly (dev0 and dev1 frames have the same length).
    frame_bytes = len(head.encode(wire.Frame("dev0", 0, 0, np.zeros((28, 28), np.uint8), label=0)))
    assert value(m, "edgeq_payload_bytes_total", direction="edge_to_cloud") == n * frame_bytes
    assert value(m, "edgeq_cloud_received_bytes_total", codec="tensor") == n * frame_bytes
    # The configured split and threshold, and the measured latency of every offloaded frame.
    assert value(m, "edgeq_split_choice", hop="edge_to_cloud", cut="edge_cnn@pool2", codec="int8") == 1
    assert value(m, "edgeq_split_threshold", hop="edge_to_cloud") == pytest.approx(0.9)
    assert value(m, "edgeq_split_mode", hop="edge_to_cloud", mode="offload") == 1
    assert value(m, "edgeq_split_measured_latency_seconds_count", hop="edge_to_cloud") == n
