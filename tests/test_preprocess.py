"""Tests of the edge preprocessing stages: noise reduction (edge_workers.denoise) and PCA (edge_workers.reduce)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_workers.denoise import METHODS, DenoiseConfig, Denoiser, median3x3
from edge_workers.reduce import PCAModel, fit_pca
from edge_workers.runtime import load_runtime
from publishers.datasets import load_mnist
from publishers.noise import NoiseConfig, add_noise

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "mnist"
N_TEST = 1000


@pytest.fixture(scope="module")
def pca() -> PCAModel:
    train = load_mnist(DATA, "train")
    return fit_pca(train.images[:3000], 160, seed=0)


@pytest.fixture(scope="module")
def test_split():
    t = load_mnist(DATA, "test")
    return t.images[:N_TEST], t.labels[:N_TEST]


NOISES = {
    "gaussian": NoiseConfig("gaussian", 0.2),
    "salt-and-pepper": NoiseConfig("salt-and-pepper", 0.05),
}


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))


# ---------------------------------------------------------------- denoise


def test_median3x3_matches_loop():
    x = np.random.default_rng(0).integers(0, 256, size=(3, 7, 9), dtype=np.uint8)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    ref = np.empty_like(x)
    for n in range(3):
        for i in range(7):
            for j in range(9):
                ref[n, i, j] = np.median(padded[n, i : i + 3, j : j + 3])
    np.testing.assert_array_equal(median3x3(x), ref)


@pytest.mark.parametrize("kind", sorted(NOISES))
def test_denoise_moves_noisy_frames_closer_to_clean(kind, pca, test_split):
    images, _ = test_split
    clean = images / np.float32(255.0)
    noisy = add_noise(images, NOISES[kind], np.random.default_rng(1))
    out = Denoiser(DenoiseConfig(), pca).apply(noisy)
    before, after = _mse(noisy / 255.0, clean), _mse(out, clean)
    # observed (pixels/255 units, 1000 test frames): gaussian 0.2: 0.0211 -> 0.0102;
    # salt-and-pepper 0.05: 0.0243 -> 0.0020
    bound = {"gaussian": 0.6, "salt-and-pepper": 0.15}[kind]
    assert after < bound * before, f"{kind}: MSE {before:.4f} noisy -> {after:.4f} denoised"


def test_auto_leaves_clean_frames_almost_untouched(pca, test_split):
    images, _ = test_split
    out = Denoiser(DenoiseConfig("auto"), pca).apply(images)
    assert _mse(out, images / 255.0) < 0.001  # observed 0.00021


def test_denoise_and_edge_cnn_accuracy(pca, test_split):
    images, labels = test_split
    rt = load_runtime("onnx", ROOT / "models" / "edge_cnn.onnx", threads=1)
    den = Denoiser(DenoiseConfig(), pca)

    def acc(x: np.ndarray) -> float:
        x = x / np.float32(255.0) if x.dtype == np.uint8 else x
        return float(np.mean(rt.predict(x[:, None]).argmax(axis=1) == labels))

    sp = add_noise(images, NoiseConfig("salt-and-pepper", 0.1), np.random.default_rng(2))
    gauss = add_noise(images, NOISES["gaussian"], np.random.default_rng(1))
    # Clean: denoising costs at most 0.3 points (observed 0.993 -> 0.992 on these 1000).
    assert acc(den.apply(images)) >= acc(images) - 0.003
    # Salt-and-pepper 0.1: denoising helps (observed 0.985 -> 0.992).
    assert acc(den.apply(sp)) >= acc(sp)
    # Gaussian 0.2: the CNN was trained with noise; denoising costs < 1 point (observed 0.994 -> 0.988).
    assert acc(den.apply(gauss)) >= acc(gauss) - 0.01


@pytest.mark.parametrize("method", METHODS)
def test_denoiser_output_contract(method, pca, test_split):
    images = test_split[0][:16]
    den = Denoiser(DenoiseConfig(method, components=64), pca)
    out = den.apply(images)
    assert out.dtype == np.float32 and out.shape == images.shape and out.flags.c_contiguous
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(den.apply(images / np.float32(255.0)), out, atol=1e-6)
    assert den.apply(images[:0]).shape == (0, 28, 28)


@pytest.mark.parametrize("method", [m for m in METHODS if m.startswith(("median", "impulse", "auto"))])
def test_numba_filter_kernel_gives_the_numpy_paths_bits(method, pca, test_split):
    """edge_workers.denoise_kernels against the numpy path, on noisy test frames and on random frames full of
    0/255 pixels (every impulse decision), batches of 1, 3 and 64, and a non-square shape."""
    den = Denoiser(DenoiseConfig(method, components=64), pca)
    assert den._kernel is not None  # numba is installed with the server extra the tests run with
    numpy_path = Denoiser(DenoiseConfig(method, components=64), pca)
    numpy_path._kernel = None
    rng = np.random.default_rng(3)
    noisy = add_noise(test_split[0][:64], NoiseConfig("salt-and-pepper", 0.1), rng)
    impulses = rng.choice(np.array([0, 1, 95, 96, 160, 200, 254, 255], dtype=np.uint8), size=(64, 28, 28))
    for frames in (noisy[:1], noisy[:3], noisy, impulses):
        np.testing.assert_array_equal(den.apply(frames), numpy_path.apply(frames))
    if not den.cfg.needs_pca:  # without a PCA model there is no image shape to match: any frame size
        den, numpy_path = Denoiser(DenoiseConfig(method)), Denoiser(DenoiseConfig(method))
        numpy_path._kernel = None
        odd = rng.integers(0, 256, size=(5, 7, 9), dtype=np.uint8)
        np.testing.assert_array_equal(den.apply(odd), numpy_path.apply(odd))


def test_denoise_config_errors(pca):
    with pytest.raises(ValueError, match="must be one of"):
        DenoiseConfig("wiener")
    with pytest.raises(ValueError, match="needs a fitted PCA"):
        Denoiser(DenoiseConfig("pca"), None)
    with pytest.raises(ValueError, match=r"k_max=160"):
        Denoiser(DenoiseConfig("pca", components=161), pca)
    with pytest.raises(ValueError, match=r"expected frames \[N, H, W\], got \[784\]"):
        Denoiser(DenoiseConfig("median")).apply(np.zeros(784, np.uint8))


# ---------------------------------------------------------------- PCA


def test_pca_matches_sklearn_and_round_trips(pca, tmp_path):
    from sklearn.decomposition import PCA

    x = load_mnist(DATA, "train").images[:3000].reshape(3000, -1) / np.float32(255.0)
    sk = PCA(n_components=32, svd_solver="full").fit(x[:1000])
    coeffs = fit_pca(x[:1000], 32).transform(x, 32)
    assert coeffs.shape == (3000, 32) and coeffs.dtype == np.float32
    # component signs may differ between fits: compare magnitudes
    np.testing.assert_allclose(np.abs(coeffs), np.abs(sk.transform(x)), atol=1e-3)  # observed < 1e-4
    gram = pca.components @ pca.components.T
    np.testing.assert_allclose(gram, np.eye(160), atol=1e-4)
    loaded = PCAModel.load(pca.save(tmp_path / "p.npz"))
    for name in ("mean", "components", "explained_variance"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(pca, name))
    assert loaded.meta == pca.meta and loaded.image_shape == (28, 28)
    # Reconstruction error of the training data = the variance left out (pixel/255 units squared).
    recon = pca.inverse_transform(pca.transform(x, 64))
    resid = float(np.sum((recon - x) ** 2) / (len(x) - 1))
    left_out = pca.meta["total_variance"] * (1 - pca.explained_variance_ratio(64))
    assert abs(resid - left_out) < 1e-3 * pca.meta["total_variance"]


def test_pca_errors(pca):
    with pytest.raises(ValueError, match=r"k must be in \[1, k_max=160\].*got 200"):
        pca.transform(np.zeros((2, 784), np.float32), 200)
    with pytest.raises(ValueError, match=r"k_max must be in \[1, min\(samples=10, dim=784\)\], got 11"):
        fit_pca(np.zeros((10, 28, 28), np.uint8), 11)
    with pytest.raises(ValueError, match=r"expected frames \[N, 784\].*got \[2, 10\]"):
        pca.transform(np.zeros((2, 10), np.float32))


def test_committed_pca_loads_without_sklearn():
    code = (
        "import sys, numpy as np; sys.modules['sklearn'] = None\n"
        "from edge_workers.reduce import PCAModel\n"
        "p = PCAModel.load('models/pca.npz')\n"
        "c = p.transform(np.zeros((3, 28, 28), np.uint8), 48)\n"
        "assert c.shape == (3, 48) and p.code_scale is not None and p.k_max >= 144\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
