"""Learning in the cloud on edge-reduced data: the experiment end to end, exact byte accounting, hot swap, errors.

Real Mosquitto, a local Ray, real edge and cloud actors; nothing is mocked.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cloud_workers.config import CloudConfig, RayConfig
from cloud_workers.learning import (
    LearnConfig,
    SampleStore,
    learn_codec,
    train_mlp,
    wait_fit,
)
from edge_workers.config import EdgeConfig
from edge_workers.reduce import PCA_FILE, PCAModel
from infra import cluster
from infra.cli import main
from infra.collector import ResultCollector
from infra.experiment import EdgeLearningConfig, _check_against_data, run_edge_learning
from infra.experiment_report import write_report
from publishers import wire
from publishers.config import PublishConfig
from publishers.errors import ConfigError
from publishers.run import publish
from tests.conftest import DATA_DIR, REPO


def frame_bytes(device_id: str) -> int:
    """Wire size of one labelled 28x28 uint8 frame from `device_id` (the header does not depend on the values)."""
    return len(wire.encode(wire.Frame(device_id, 0, 0, np.zeros((28, 28), np.uint8), 3)))


def test_experiment_end_to_end_counts_every_byte(local_ray, tmp_path):
    cfg = EdgeLearningConfig(codecs=("raw", "pca-int8"), pca_sizes=(16,), train_sizes=(100, 300), noise=("none",),
                             devices=2, test_frames=200, max_epochs=15, patience=5)
    result = run_edge_learning(cfg, progress=lambda line: None)

    assert [(r.codec, r.k) for r in result.runs] == [("raw", 0), ("pca-int8", 16)]
    per_frame = frame_bytes("dev0")  # dev0 and dev1: same id length, same frame size
    for r in result.runs:
        assert (r.train_frames, r.eval_frames) == (300, 200)
        # device -> edge: what the devices published is what the edge counted, frame by frame
        assert r.device_bytes_train == r.bytes_device_to_edge == 300 * per_frame
        # edge -> cloud: what the edge sent is what the cloud received, code_size bytes per frame
        assert r.bytes_edge_to_cloud == 300 * r.code_size
        assert r.cloud_bytes_received == (300 + 200) * r.code_size
        # the learned model answered every held-out frame published on the frames topic, none degraded
        assert (r.served_frames, r.degraded) == (200, 0)
    raw, pca = result.runs
    assert raw.code_size == 784 and pca.code_size == 16
    assert raw.bytes_edge_to_cloud == 49 * pca.bytes_edge_to_cloud
    fits = {(f.codec, f.n_train): f for f in result.fits}
    assert set(fits) == {("raw", 100), ("raw", 300), ("pca-int8", 100), ("pca-int8", 300)}
    for f in fits.values():
        assert 0.3 < f.heldout_accuracy <= 1.0  # 10 classes: chance is 0.1; observed 0.6-0.85 on 100-300 frames
    for r in result.runs:  # served = held-out accuracy of the last (largest) fit: same frames, same noise seed
        assert r.served_accuracy == pytest.approx(fits[(r.codec, 300)].heldout_accuracy)

    page = write_report(result, tmp_path / "edge-learning.md", "edgeq experiment edge-learning (test)")
    text = page.read_text()
    assert "| none | pca-int8 k=16 | 16 |" in text
    for suffix in ("accuracy", "bytes", "train-time"):
        png = tmp_path / f"edge-learning-{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hot_swap_keeps_answering_frames(local_ray, broker, mqtt_cfg):
    import ray

    ray_cfg = RayConfig(namespace="test-edge-learning-swap")
    cloud = cluster.start_cloud(CloudConfig(actors=1, metrics_port=0), ray_cfg)
    edge = None
    try:
        edge = cluster.start_edge(EdgeConfig(actors=1, metrics_port=0, codec="raw", policy="cloud-only",
                                             runtime="onnx", model="edge_cnn.onnx", learn=True,
                                             cloud_timeout_s=120.0), mqtt_cfg, ray_cfg, cloud.names)
        handle = cloud.handles[0]
        train = publish(mqtt_cfg, PublishConfig(devices=2, rate_hz=0, count=200, split="train", topic="train",
                                                data_dir=str(DATA_DIR), device_prefix="t"))
        deadline = time.monotonic() + 120
        while ray.get(handle.learning_stats.remote()).get("stored.train.raw.784", 0) < 400:
            assert time.monotonic() < deadline, "the cloud did not store the 400 training frames"
            time.sleep(0.1)
        assert train.total("bytes_sent") == 400 * frame_bytes("t0")
        with pytest.raises(ValueError, match="unknown uplink codec 'jpeg'"):
            ray.get(handle.add_training.remote("train", "jpeg", bytes(784), 1, b"\x01", [("t0", 0)]))
        with pytest.raises(ValueError, match=r"asked for 5000 train samples of raw \(784 B/frame\), have 400"):
            ray.get(handle.fit.remote("raw", 784, 5000))
        assert ray.get(handle.learning_stats.remote())["rejected_batches"] == 1

        collector = ResultCollector(mqtt_cfg).start()
        stop = threading.Event()
        reports = []
        frames = PublishConfig(devices=2, rate_hz=40, count=0, duration_s=120, split="test", data_dir=str(DATA_DIR))
        pub = threading.Thread(target=lambda: reports.append(publish(mqtt_cfg, frames, stop=stop)), daemon=True)
        pub.start()
        assert collector.wait_for(20, 60), "frames were not answered before the fit"
        # A deliberately long fit (no early stopping, 784 inputs): frames must keep flowing meanwhile.
        job = ray.get(handle.fit.remote("raw", 784, 0, {"hidden": (512,), "max_epochs": 60, "patience": 60}))
        at_start, during = collector.answered(), collector.answered()
        deadline = time.monotonic() + 600
        while ray.get(handle.fit_status.remote(job))["state"] == "running":
            assert time.monotonic() < deadline, "fit did not finish"
            during = collector.answered()
            time.sleep(0.2)
        status = wait_fit(handle, job)
        assert collector.wait_for(during + 20, 60), "frames were not answered after the swap"
        stop.set()
        pub.join(30)
        sent = reports[0].total("acked")
        assert collector.wait_for(sent, 60)
        answers = collector.stop()
        assert during > at_start + 10  # answered while the fit ran (observed: hundreds)
        assert len(answers.unique) == sent and answers.degraded == 0  # none dropped, none degraded
        assert answers.tiers["cloud"] == sent
        assert status["swapped"] and ray.get(handle.learning_stats.remote())["learned.raw.784"] == job
    finally:
        if edge is not None:
            stats = cluster.stop_tier(edge, "stop")[0]
            assert stats["learn.train.bytes_edge_to_cloud"] == 400 * 784
        cluster.stop_tier(cloud)


def test_impossible_settings_fail_clearly(capsys):
    pca = PCAModel.load(REPO / "models" / PCA_FILE)
    with pytest.raises(ConfigError, match=r"unknown codec\(s\) \['jpeg'\]"):
        EdgeLearningConfig(codecs=("raw", "jpeg"))
    with pytest.raises(ConfigError, match=r"more PCA components \(k=64\) than samples .*\(50\)"):
        _check_against_data(EdgeLearningConfig(pca_sizes=(64,), train_sizes=(50, 0)), 10_000, pca)
    with pytest.raises(ConfigError, match=rf"PCA k=400 > {pca.k_max} components"):
        _check_against_data(EdgeLearningConfig(pca_sizes=(400,), train_sizes=(500,)), 10_000, pca)
    with pytest.raises(ConfigError, match="training-set size 20000 > 10000"):
        _check_against_data(EdgeLearningConfig(train_sizes=(20_000,)), 10_000, pca)
    with pytest.raises(ValueError, match="unknown uplink codec 'jpeg'"):
        learn_codec("jpeg", 784, pca, (28, 28))
    with pytest.raises(ValueError, match=rf"k must be in \[1, k_max={pca.k_max}\].*got 500"):
        learn_codec("pca-int8", 500, pca, (28, 28))
    assert main(["experiment", "edge-learning", "--codecs", "raw,jpeg"]) == 2
    assert "unknown codec(s) ['jpeg']" in capsys.readouterr().err


def test_store_takes_nested_balanced_subsets_and_mlp_learns():
    rng = np.random.default_rng(0)
    store = SampleStore()
    labels = np.repeat(np.arange(10, dtype=np.uint8), 50)  # sorted by class, like the bundled train split
    codes = (rng.normal(size=(500, 8)) * 20 + labels[:, None] * 10).astype(np.uint8)
    keys = [("d0", i) for i in range(500)]
    assert store.add(("train", "pca-int8", 8), codes, labels, keys) == 0
    assert store.add(("train", "pca-int8", 8), codes[:5], labels[:5], keys[:5]) == 5  # redelivered: dropped
    small, y_small = store.take(("train", "pca-int8", 8), 100, seed=3)
    big, _ = store.take(("train", "pca-int8", 8), 300, seed=3)
    np.testing.assert_array_equal(big[:100], small)
    assert len(np.unique(y_small)) == 10  # a shuffled prefix, not the first classes
    with pytest.raises(ValueError, match="asked for 501 .* have 500"):
        store.take(("train", "pca-int8", 8), 501)
    x = rng.normal(size=(600, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = train_mlp(x, y, LearnConfig(hidden=(32,), max_epochs=40, patience=40, lr=1e-2))
    assert np.mean(model.logits(x).argmax(axis=1) == y) > 0.9  # a linearly separable toy set; observed 0.995
    with pytest.raises(ValueError, match="need at least"):
        train_mlp(x[:5], y[:5], LearnConfig())
