"""Publishers against a real Mosquitto: delivery, order, broker restarts, bounded buffers."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np

from edge_workers.ingest import Subscriber, decode_frame
from infra.broker import MosquittoBroker
from publishers.config import PublishConfig
from publishers.datasets import load_mnist
from publishers.mqtt import MqttConfig
from publishers.run import build_devices, publish, run_devices
from tests.conftest import DATA_DIR, REPO, collect


def _frames(messages):
    return [decode_frame(m) for m in messages]


def _run_in_background(devices) -> tuple[threading.Thread, dict]:
    """Run the devices in a thread; its PublishReport lands in result["report"]."""
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("report", run_devices(devices)))
    runner.start()
    return runner, result


def test_1000_frames_from_4_devices_arrive_in_order(mqtt_cfg: MqttConfig) -> None:
    sub = Subscriber(mqtt_cfg, "test-sub").start()
    sub.wait_subscribed()
    cfg = PublishConfig(devices=4, count=250, rate_hz=0, data_dir=str(DATA_DIR), noise="gaussian", noise_level=0.1)
    report = publish(mqtt_cfg, cfg)
    frames = _frames(collect(sub, 1000, timeout=30))
    sub.stop()

    assert report.total("acked") == 1000 and not report.dropped
    assert len(frames) == 1000
    test = load_mnist(DATA_DIR, "test")
    for i in range(4):
        mine = [f for f in frames if f.device_id == f"dev{i}"]
        assert [f.seq for f in mine] == list(range(250)), f"dev{i} frames missing or out of order"
        # device i replays test images i, i+4, ...: labels travel with the frames
        assert [f.label for f in mine] == test.labels[i::4][:250].tolist()
        assert all(f.noisy and f.pixels.shape == (28, 28) for f in mine)
    # noise was added: frames differ from the clean images, but not beyond recognition
    first = next(f for f in frames if f.device_id == "dev0" and f.seq == 0)
    diff = np.abs(first.pixels.astype(int) - test.images[0].astype(int))
    assert 0 < diff.mean() < 40  # observed ~20 grey levels for sigma = 0.1 * 255 with clipping


def test_broker_restart_mid_stream_loses_no_frame(mqtt_cfg: MqttConfig, broker: MosquittoBroker) -> None:
    # A persistent subscriber session: the broker queues (and persists) frames for it while it reconnects.
    sub = Subscriber(mqtt_cfg, "test-restart-sub", persistent=True).start()
    sub.wait_subscribed()
    cfg = PublishConfig(devices=2, count=400, rate_hz=200, data_dir=str(DATA_DIR))
    devices = build_devices(mqtt_cfg, cfg)
    runner, result = _run_in_background(devices)
    deadline = time.monotonic() + 20
    while sum(d.stats.acked for d in devices) < 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    broker.restart(down_s=1.0)  # mid-stream: about half the frames are out
    runner.join(timeout=90)
    assert not runner.is_alive(), "publishers did not finish after the broker came back"
    expected = {(f"dev{i}", s) for i in range(2) for s in range(400)}
    unique: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 30  # QoS 1 may redeliver: read until every frame was seen once
    while unique != expected and time.monotonic() < deadline:
        unique.update((f.device_id, f.seq) for f in _frames(sub.get_batch(1000, 0.1)))
    sub.stop()

    report = result["report"]
    assert report.total("connects") >= 4, "each device should have reconnected once"
    assert not report.dropped
    assert unique == expected, f"lost {len(expected - unique)} frames"


def _publish_while_broker_down(mqtt_cfg, broker, policy):
    sub = Subscriber(mqtt_cfg, f"test-{policy}", persistent=True).start()
    sub.wait_subscribed()
    broker.stop()
    cfg = PublishConfig(devices=1, count=50, rate_hz=0, queue_size=10, drop_policy=policy, data_dir=str(DATA_DIR))
    devices = build_devices(mqtt_cfg, cfg)
    runner, result = _run_in_background(devices)
    deadline = time.monotonic() + 10
    while devices[0].stats.generated < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    broker.start()
    runner.join(timeout=60)
    frames = _frames(collect(sub, 10, timeout=20))
    sub.stop()
    return result["report"], sorted(f.seq for f in frames)


def test_full_buffer_drop_oldest_keeps_newest_and_counts(mqtt_cfg, broker) -> None:
    report, seqs = _publish_while_broker_down(mqtt_cfg, broker, "drop-oldest")
    assert report.dropped == {"queue_full": 40}
    assert seqs == list(range(40, 50))


def test_full_buffer_drop_newest_keeps_oldest_and_counts(mqtt_cfg, broker) -> None:
    report, seqs = _publish_while_broker_down(mqtt_cfg, broker, "drop-newest")
    assert report.dropped == {"queue_full": 40}
    assert seqs == list(range(10))


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'ray', 'onnxruntime', 'sklearn', 'torch', 'onnx'}:
            raise ImportError('blocked on the publisher path: ' + name)
sys.meta_path.insert(0, Block())
from infra.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_publisher_path_needs_no_server_packages(broker: MosquittoBroker) -> None:
    """A device runs `edgeq publish` with the base install: no Ray, onnxruntime, scikit-learn or torch."""
    args = ["publish", "--broker", broker.address, "--devices", "2", "--count", "5", "--rate", "0",
            "--data-dir", str(DATA_DIR)]
    proc = subprocess.run([sys.executable, "-c", BLOCKER, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "confirmed=10" in proc.stdout


def _statuses(sub: Subscriber, timeout: float) -> list[tuple[str, bytes]]:
    return [(m.topic, m.payload) for m in collect(sub, 1, timeout)]


def test_status_is_retained_online_then_offline_by_last_will(mqtt_cfg: MqttConfig, broker: MosquittoBroker) -> None:
    """A device killed without a goodbye is marked offline by its Last Will; the state is retained."""
    import os
    import signal

    from publishers import topics

    env = {**os.environ, "EDGEQ_MQTT__KEEPALIVE_S": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "publish", "--broker", broker.address, "--devices", "1",
         "--count", "0", "--rate", "20", "--device-prefix", "cam", "--data-dir", str(DATA_DIR)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        sub = Subscriber(mqtt_cfg, "test-status", topic_filter=topics.STATUS_FILTER).start()
        sub.wait_subscribed()
        first = _statuses(sub, 15)
        assert first == [(topics.status("device.cam0"), b"online")]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert _statuses(sub, 10) == [(topics.status("device.cam0"), b"offline")]  # after ~1.5 keepalives
        sub.stop()
    finally:
        proc.kill()
        proc.wait(timeout=10)
    late = Subscriber(mqtt_cfg, "test-status-late", topic_filter=topics.STATUS_FILTER).start()
    assert _statuses(late, 10) == [(topics.status("device.cam0"), b"offline")]  # retained for newcomers
    late.stop()


def test_mqtt5_clients_deliver_too(broker: MosquittoBroker) -> None:
    cfg = MqttConfig(host=broker.host, port=broker.port, protocol="5")
    sub = Subscriber(cfg, "test-v5-sub").start()
    sub.wait_subscribed()
    report = publish(cfg, PublishConfig(devices=2, count=25, rate_hz=0, data_dir=str(DATA_DIR)))
    frames = _frames(collect(sub, 50, timeout=15))
    sub.stop()
    assert report.total("acked") == 50
    assert sorted((f.device_id, f.seq) for f in frames) == [(f"dev{i}", s) for i in range(2) for s in range(25)]


def _head_partition(tmp_path):
    """edge_cnn cut at pool2 written into tmp_path (the test process may import onnx; the device does not)."""
    from modelstore.partition_files import write_partition

    write_partition(REPO / "models" / "edge_cnn.onnx", tmp_path, ["pool2"])
    return tmp_path / "edge_cnn@pool2.head.onnx"


def test_publish_head_needs_onnxruntime_only_and_sends_tensor_frames(broker: MosquittoBroker, mqtt_cfg, tmp_path):
    """`edgeq publish --head`: the device runs the head on onnxruntime (ray, scikit-learn, torch and onnx still
    blocked) and publishes tensor frames on the tensors topic; the summary gives bytes per frame."""
    from publishers import topics, wire

    head = _head_partition(tmp_path)
    sub = Subscriber(mqtt_cfg, "test-head-cli", topic_filter=topics.TENSORS_FILTER).start()
    sub.wait_subscribed()
    blocker = BLOCKER.replace("'onnxruntime', ", "")
    args = ["publish", "--broker", broker.address, "--devices", "2", "--count", "5", "--rate", "0",
            "--data-dir", str(DATA_DIR), "--head", str(head), "--codec", "int8"]
    proc = subprocess.run([sys.executable, "-c", blocker, *args], check=False, capture_output=True, text=True,
                          timeout=60)
    msgs = collect(sub, 10, timeout=15)
    sub.stop()
    assert proc.returncode == 0, proc.stderr
    assert "confirmed=10 bytes=5900 (590.0 per frame)" in proc.stdout  # 590 B: docs/partition.md, pool2 int8
    assert "head edge_cnn@pool2 (int8, shape 32x4x4): 590.0 B/tensor frame" in proc.stdout
    frames = [wire.decode_tensor(m.payload) for m in msgs]
    assert sorted((m.topic, f.device_id, f.seq) for m, f in zip(msgs, frames, strict=True)) == [
        (topics.tensors(f"dev{d}"), f"dev{d}", s) for d in range(2) for s in range(5)]
    assert {(f.cut_id, f.codec, f.shape) for f in frames} == {("edge_cnn@pool2", "int8", (32, 4, 4))}


def test_publish_reports_bytes_per_pixel_frame(mqtt_cfg: MqttConfig) -> None:
    report = publish(mqtt_cfg, PublishConfig(devices=1, count=3, rate_hz=0, data_dir=str(DATA_DIR)))
    assert report.bytes_per_frame == 828 and "bytes=2484 (828.0 per frame)" in report.summary()


def test_publish_head_option_errors_name_the_problem(tmp_path, capsys) -> None:
    from infra.cli import main

    head = _head_partition(tmp_path)
    manifest = tmp_path / "edge_cnn.partition.json"
    cases = [
        (["--cut", "pool2"], "publish.cut 'pool2' names a cut of a partition: it needs publish.head"),
        (["--head", str(head), "--topic", "train"], "publish.topic must be frames, got 'train'"),
        (["--head", str(manifest)], "is a partition manifest: name the cut with --cut"),
        (["--head", str(manifest), "--cut", "fc1"], "has no cut 'fc1'; its cuts: edge_cnn@pool2"),
        (["--head", str(head), "--codec", "pq8"], "offers the codecs float32, float16, int8, int8-channel, not 'pq8'"),
        (["--head", str(tmp_path / "edge_cnn@relu1.head.onnx")],
         "has no cut 'edge_cnn@relu1'; its cuts: edge_cnn@pool2"),
        (["--head", str(tmp_path / "gone" / "edge_cnn@pool2.head.onnx")], "cannot read partition manifest"),
    ]
    for extra, message in cases:
        # No broker is needed: each is refused before a device connects (a bounded 1-frame run otherwise).
        code = main(["publish", "--broker", "127.0.0.1:1", "--devices", "1", "--count", "1", *extra])
        assert code == 2 and message in capsys.readouterr().err, extra
