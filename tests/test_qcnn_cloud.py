"""The committed Q-CNN cloud CNN (models/cloud_cnn.qcnn.onnx): manifest entry, size and accuracy targets,
one native net."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_workers.runtime import load_runtime
from modelstore.files import sha256_file
from modelstore.interface import to_input
from publishers.datasets import load_mnist
from tests.conftest import DATA_DIR, REPO

FLOAT = REPO / "models" / "cloud_cnn.onnx"
MAX_BYTES = FLOAT.stat().st_size // 15  # 88,184 B: at least 15x smaller than the float file (issue 16)
MAX_LOSS = 0.005  # accuracy (as a fraction) lost against the float model on the test split


@pytest.fixture(scope="module")
def entry():
    return json.loads((REPO / "models" / "manifest.json").read_text())["models"]["cloud_qcnn"]


def test_committed_cloud_model_matches_manifest_and_targets(entry):
    path = REPO / "models" / entry["file"]
    assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["bytes"] <= MAX_BYTES  # 46,303 B
    assert entry["float_model"]["file"] == FLOAT.name
    test = load_mnist(DATA_DIR, "test")
    x = to_input(test.images)
    measured = float((load_runtime("qcnn", path).predict(x).argmax(axis=1) == test.labels).mean())
    assert measured == pytest.approx(entry["test_accuracy"]["clean"], abs=1e-9)  # observed 0.9960
    float_acc = float((load_runtime("onnx", FLOAT).predict(x).argmax(axis=1) == test.labels).mean())
    assert measured >= float_acc - MAX_LOSS  # float 0.9940


def test_cloud_model_runs_as_one_native_net_and_matches_segments(entry):
    from edge_workers.qcnn import native_net

    path = REPO / "models" / entry["file"]
    direct = load_runtime("qcnn", path)
    kinds = [layer[0] for layer in direct._run.net.layers]
    assert kinds.count(native_net.PQCONV) == 3 and kinds.count(native_net.PQGEMM) == 1
    x = to_input(load_mnist(DATA_DIR, "test").images[:200])
    y_net, y_seg = direct.predict(x), load_runtime("qcnn", path, mode="segments").predict(x)
    assert float((y_net.argmax(1) == y_seg.argmax(1)).mean()) >= 0.995  # observed 1.0
    assert np.abs(y_net - y_seg).max() <= 2e-2 * np.abs(y_seg).max()
    assert np.array_equal(load_runtime("qcnn", path, threads=2).predict(x), y_net)
