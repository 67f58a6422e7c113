"""Tests of the uplink codecs (edge_workers.codecs): byte accounting, round trips, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edge_workers import codecs
from edge_workers.codecs import CODECS, UplinkCodec, calibrate_int8
from edge_workers.denoise import DenoiseConfig, Denoiser
from edge_workers.reduce import fit_pca
from publishers.datasets import load_mnist
from publishers.noise import NoiseConfig, add_noise

DATA = Path(__file__).resolve().parents[1] / "data" / "mnist"
K = 48


@pytest.fixture(scope="module")
def setup():
    train = load_mnist(DATA, "train").images
    pca = fit_pca(train[:1500], 64, seed=0)
    pca = pca.with_code_scale(calibrate_int8(pca.transform(train[:1500])))
    frames = add_noise(load_mnist(DATA, "test").images[:200], NoiseConfig("gaussian", 0.2), np.random.default_rng(0))
    return pca, Denoiser(DenoiseConfig(components=64), pca), frames


def _codec(name, setup):
    pca, den, _ = setup
    return UplinkCodec(name, denoiser=den, pca=pca, k=K)


@pytest.mark.parametrize("name, size", [("raw", 784), ("denoised", 784), ("pca-f16", 2 * K), ("pca-int8", K)])
def test_byte_accounting(name, size, setup):
    codec, frames = _codec(name, setup), setup[2]
    payloads = codec.encode(frames)
    assert codec.code_size == size
    assert all(isinstance(p, bytes) for p in payloads) and len(payloads) == len(frames)
    assert sum(len(p) for p in payloads) == codec.payload_bytes(len(frames)) == size * len(frames)


def test_raw_round_trip_is_exact(setup):
    frames = setup[2]
    x = codecs.decode("raw", codecs.encode("raw", frames))
    assert x.shape == (200, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(np.rint(x[:, 0] * 255).astype(np.uint8), frames)
    np.testing.assert_array_equal(x[:, 0], frames / np.float32(255.0))


def test_denoised_round_trip(setup):
    _, den, frames = setup
    x = codecs.decode("denoised", codecs.encode("denoised", frames, denoiser=den))
    assert x.shape == (200, 1, 28, 28)
    assert np.max(np.abs(x[:, 0] - den.apply(frames))) <= 0.5 / 255 + 1e-6  # uint8 rounding only


def test_pca_f16_round_trip(setup):
    pca, den, frames = setup
    ref = pca.transform(den.apply(frames), K)
    x = codecs.decode("pca-f16", codecs.encode("pca-f16", frames, denoiser=den, pca=pca, k=K), pca=pca, k=K)
    assert x.shape == (200, K) and x.dtype == np.float32
    # float16 keeps 11 significant bits: relative error <= 2**-11 (observed max 4.8e-4 relative)
    assert np.all(np.abs(x - ref) <= 2.0**-11 * np.abs(ref) + 1e-7)


def test_pca_int8_round_trip(setup):
    pca, den, frames = setup
    ref = pca.transform(den.apply(frames), K)
    scale = pca.code_scale[:K]
    x = codecs.decode("pca-int8", codecs.encode("pca-int8", frames, denoiser=den, pca=pca, k=K), pca=pca, k=K)
    inside = np.abs(ref) <= 127 * scale
    # within range: error <= half a step; outside (noisier than calibration data): clipped to the range end
    assert np.all(np.abs(x - ref)[inside] <= 0.5 * np.broadcast_to(scale, ref.shape)[inside] * (1 + 1e-5))
    np.testing.assert_allclose(np.abs(x[~inside]), np.broadcast_to(127 * scale, ref.shape)[~inside], rtol=1e-6)
    rel = np.linalg.norm(x - ref) / np.linalg.norm(ref)
    assert rel < 0.02  # observed 0.006


def test_precomputed_stages_give_the_same_payloads(setup):
    pca, den, frames = setup
    denoised = den.apply(frames)
    coeffs = pca.transform(denoised, K)
    for name in CODECS:
        codec = _codec(name, setup)
        assert codec.encode(frames) == codec.encode(frames, denoised=denoised, coeffs=coeffs), name
    # more columns than k: the first k are used (equal up to float rounding of the longer matmul)
    codec = _codec("pca-f16", setup)
    wide = codec.decode(codec.encode(frames, coeffs=pca.transform(denoised)))
    np.testing.assert_allclose(wide, codec.decode(codec.encode(frames)), rtol=2.0**-10, atol=1e-6)


def test_errors(setup):
    pca, _, frames = setup
    with pytest.raises(ValueError, match="unknown uplink codec 'jpeg'; available: raw, denoised, pca-f16, pca-int8"):
        codecs.encode("jpeg", frames)
    with pytest.raises(ValueError, match=r"k must be in \[1, k_max=64\].*got 65"):
        UplinkCodec("pca-f16", pca=pca, k=65)
    with pytest.raises(ValueError, match="needs a fitted PCA"):
        UplinkCodec("pca-int8")
    with pytest.raises(ValueError, match="needs a PCA model with code_scale"):
        UplinkCodec("pca-int8", pca=dataclasses.replace(pca, code_scale=None))
    with pytest.raises(ValueError, match="needs a Denoiser or the denoised frames"):
        UplinkCodec("denoised").encode(frames)
    with pytest.raises(ValueError, match=r"pca-int8 payload 1: expected 48 bytes, got 47"):
        codecs.decode("pca-int8", [b"\0" * 48, b"\0" * 47], pca=pca, k=K)
    with pytest.raises(ValueError, match=r"expected uint8 frames \[2, 28, 28\], got float32 \[2, 28, 28\]"):
        codecs.encode("raw", np.zeros((2, 28, 28), np.float32))
    assert codecs.decode("raw", []).shape == (0, 1, 28, 28)
