"""The cloud tier on the Q-CNN cloud CNN (cloud.runtime qcnn) through the real pipeline: Mosquitto, local Ray, devices.

Every frame goes to the cloud (policy cloud-only, raw frames); the same frames are answered once with the float cloud
CNN and once with the Q-CNN one, and their accuracies must agree within half a point (issue 16).
"""

from __future__ import annotations

import time

import pytest

from cloud_workers.config import CloudConfig, RayConfig
from edge_workers.config import EdgeConfig
from infra import cluster
from infra.collector import ResultCollector
from publishers.config import PublishConfig
from publishers.run import publish
from tests.conftest import DATA_DIR

FRAMES_PER_DEVICE = 150
ACCURACY: dict[str, float] = {}  # runtime -> accuracy of the cloud on the frames (filled by the tier test)


def test_cloud_runtime_qcnn_picks_the_qcnn_cloud_model_and_is_checked():
    from publishers.errors import ConfigError

    assert CloudConfig(runtime="qcnn").frame_model == "cloud_cnn.qcnn.onnx"
    assert CloudConfig(runtime="qcnn", frame_model="other.qcnn.onnx").frame_model == "other.qcnn.onnx"
    assert CloudConfig().runtime == "onnx" and CloudConfig().frame_model == "cloud_cnn.onnx"
    with pytest.raises(ConfigError, match="cloud.runtime must be one of onnx, qcnn, got 'tflite'"):
        CloudConfig(runtime="tflite")


@pytest.fixture
def tiers(local_ray, broker, mqtt_cfg, request):
    """Cloud (frame model on runtime `request.param`) + edge tiers in a namespace of their own."""
    ns = f"test-{request.node.name}".replace("[", "-").replace("]", "")[:60]
    ray_cfg = RayConfig(namespace=ns)
    cloud = cluster.start_cloud(CloudConfig(actors=1, metrics_port=0, runtime=request.param), ray_cfg)
    edge = None
    try:
        edge = cluster.start_edge(EdgeConfig(actors=2, metrics_port=0, policy="cloud-only", codec="raw"), mqtt_cfg,
                                  ray_cfg, cloud.names)
        yield cloud
    finally:
        if edge is not None:
            cluster.stop_tier(edge)
        cluster.stop_tier(cloud)


@pytest.mark.parametrize("tiers", ["onnx", "qcnn"], indirect=True)
def test_cloud_tier_answers_every_frame_with_its_frame_model(tiers, mqtt_cfg, request):
    runtime = request.node.callspec.params["tiers"]
    assert tiers.infos[0]["frame_model"] == {
        "file": "cloud_cnn.qcnn.onnx" if runtime == "qcnn" else "cloud_cnn.onnx", "runtime": runtime}
    collector = ResultCollector(mqtt_cfg, "test-results").start()
    try:
        pub = PublishConfig(devices=2, count=FRAMES_PER_DEVICE, rate_hz=0, data_dir=str(DATA_DIR))
        report = publish(mqtt_cfg, pub)
        answered = collector.wait_for(report.total("acked"), 90.0)
        assert answered, f"only {collector.answered()} of {report.total('acked')} frames answered"
        time.sleep(0.5)
    finally:
        answers = collector.stop()
    assert len(answers.unique) == 2 * FRAMES_PER_DEVICE and answers.tiers == {"cloud": 2 * FRAMES_PER_DEVICE}
    assert answers.degraded == 0
    ACCURACY[runtime] = answers.accuracy


def test_qcnn_cloud_tier_is_within_half_a_point_of_the_float_one():
    if set(ACCURACY) != {"onnx", "qcnn"}:
        pytest.skip("needs both tier runs of this module")
    # observed: float and Q-CNN 1.000 on these 300 clean frames
    assert ACCURACY["qcnn"] >= ACCURACY["onnx"] - 0.005, ACCURACY
    assert ACCURACY["qcnn"] >= 0.98, ACCURACY
