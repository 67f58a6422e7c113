"""Tests of the cloud PCA MLP (cloud_workers.pca_model): training, ONNX export, committed model, manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from cloud_workers.pca_model import (
    INPUT_NAME,
    MLP_FILE,
    OUTPUT_NAME,
    PcaMlpConfig,
    export_mlp_onnx,
    onnx_mlp_logits,
    pipeline_coefficients,
    train_pca_mlp,
)
from edge_workers.codecs import UplinkCodec
from edge_workers.denoise import DenoiseConfig, Denoiser
from edge_workers.reduce import PCA_FILE, PCAModel
from modelstore.files import sha256_file
from modelstore.interface import EVAL_NOISE
from publishers.datasets import load_mnist
from publishers.noise import add_noise

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DATA = ROOT / "data" / "mnist"


def test_export_matches_sklearn(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12)).astype(np.float32) * np.linspace(3, 0.1, 12, dtype=np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0)
    model = train_pca_mlp(x, y, PcaMlpConfig(hidden=(32, 16), max_epochs=5, classes=4, seed=0))
    path = export_mlp_onnx(model, tmp_path / "m.onnx")
    got = onnx_mlp_logits(path, x)
    assert got.shape == (600, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, model.logits(x), atol=1e-4)  # observed ~1e-6
    # sklearn's probabilities are the softmax of these logits
    p = np.exp(got - got.max(axis=1, keepdims=True))
    np.testing.assert_allclose(p / p.sum(axis=1, keepdims=True), model.mlp.predict_proba(x / model.input_scale),
                               atol=1e-5)
    assert {n.op_type for n in onnx.load(str(path)).graph.node} == {"Gemm", "Relu"}
    with pytest.raises(ValueError, match=r"expected labels \[600\], got \[5\]"):
        train_pca_mlp(x, y[:5])
    with pytest.raises(ValueError, match=r"expected coefficients \[N, 12\], got \[2, 3\]"):
        model.logits(np.zeros((2, 3), np.float32))


def test_fit_reduction_models_quick_without_torch(tmp_path):
    """A small end-to-end fit (2,500 train images, 1 augmented copy) with torch made unimportable."""
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "models": {"edge": {"file": "edge_cnn.onnx"}}}))
    code = (
        "import sys\n"
        "class NoTorch:\n"  # `import torch` fails (sys.modules['torch'] = None would confuse scipy)
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('torch blocked by test')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from cloud_workers.pca_model import PcaMlpConfig, fit_reduction_models\n"
        f"fit_reduction_models('{DATA}', '{tmp_path}', components=32, seed=7, limit=2500, copies=1,\n"
        "                     mlp_cfg=PcaMlpConfig(hidden=(128,), max_epochs=15, patience=3, seed=7))\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    models = json.loads((tmp_path / "manifest.json").read_text())["models"]
    assert set(models) == {"edge", "pca", "cloud_pca"}  # other entries kept
    for key in ("pca", "cloud_pca"):
        path = tmp_path / models[key]["file"]
        assert models[key]["sha256"] == sha256_file(path) and models[key]["bytes"] == path.stat().st_size
    entry = models["cloud_pca"]
    assert entry["payload_bytes"] == 32 and entry["train_samples"] == 2 * 2250
    assert entry["export_check"]["argmax_agreement"] == 1.0
    # observed 0.933 clean, 0.920 gaussian_0.2 (2,250 images + 1 augmented copy, 15 epochs)
    assert entry["test_accuracy"]["clean"] > 0.9 and entry["test_accuracy"]["gaussian_0.2"] > 0.9
    assert PCAModel.load(tmp_path / PCA_FILE).code_scale is not None


@pytest.fixture(scope="module")
def committed():
    manifest = json.loads((MODELS / "manifest.json").read_text())["models"]
    pca = PCAModel.load(MODELS / manifest["pca"]["file"])
    return manifest, pca


def test_committed_models_match_manifest(committed):
    manifest, pca = committed
    for key, name in (("pca", PCA_FILE), ("cloud_pca", MLP_FILE)):
        entry = manifest[key]
        assert entry["file"] == name and entry["sha256"] == sha256_file(MODELS / name)
        assert entry["bytes"] == (MODELS / name).stat().st_size
    entry = manifest["cloud_pca"]
    graph = onnx.load(str(MODELS / MLP_FILE)).graph
    assert graph.input[0].name == INPUT_NAME and graph.output[0].name == OUTPUT_NAME
    assert graph.input[0].type.tensor_type.shape.dim[1].dim_value == entry["components"] <= 64
    assert entry["payload_bytes"] == entry["components"] <= pca.k_max  # pca-int8: 1 byte per coefficient


def test_committed_model_accuracy_through_pipeline(committed):
    """Held-out test-3k through denoise -> PCA -> pca-int8 codec -> onnxruntime, as the pipeline serves it."""
    manifest, pca = committed
    entry = manifest["cloud_pca"]
    test = load_mnist(DATA, "test")
    denoiser = Denoiser(DenoiseConfig(**manifest["pca"]["denoise"]), pca)
    codec = UplinkCodec("pca-int8", denoiser=denoiser, pca=pca, k=entry["components"])
    noisy = add_noise(test.images, EVAL_NOISE, np.random.default_rng(entry["seed"]))
    acc = {}
    for name, images in (("clean", test.images), ("gaussian_0.2", noisy)):
        logits = onnx_mlp_logits(MODELS / MLP_FILE, pipeline_coefficients(images, denoiser, codec))
        acc[name] = float(np.mean(logits.argmax(axis=1) == test.labels))
        assert abs(acc[name] - entry["test_accuracy"][name]) <= 0.0005, (name, acc, entry["test_accuracy"])
    assert acc["gaussian_0.2"] >= 0.97, acc  # observed 0.980 (clean 0.984), k = 64
