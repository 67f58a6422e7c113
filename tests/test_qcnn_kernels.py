"""Q-CNN kernels (numba and numpy reference) against plain float layers with the PQ-reconstructed weights."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_workers.qcnn import kernels
from edge_workers.qcnn.pq import PQWeights, pack_codes, train_kmeans, unpack_codes

TOL = {"rtol": 1e-4, "atol": 1e-4}  # float32 sums of <= a few hundred terms; observed max abs diff ~2e-6


def conv_float(x, w, b, strides, pads, dilations, group):
    """Direct float64 convolution, x [N, C, H, W], w [C_out, C/group, kh, kw], pads (top, left, bottom, right)."""
    N, C, H, W = x.shape
    C_out, Cg, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    OH = (H + pads[0] + pads[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    OW = (W + pads[1] + pads[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    y = np.zeros((N, C_out, OH, OW))
    Cog = C_out // group
    for o in range(C_out):
        g = o // Cog
        for oh in range(OH):
            for ow in range(OW):
                h0, w0 = oh * strides[0], ow * strides[1]
                patch = xp[:, g * Cg:(g + 1) * Cg, h0:h0 + dilations[0] * (kh - 1) + 1:dilations[0],
                           w0:w0 + dilations[1] * (kw - 1) + 1:dilations[1]]
                y[:, o, oh, ow] = (patch * w[o]).sum(axis=(1, 2, 3)) + b[o]
    return y


CONV_CASES = [
    # C_in, C_out, kernel, strides, pads, dilations, group, dsub, K, H, W
    (6, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 3, 7, 7, 9),
    (8, 6, (3, 2), (2, 1), (1, 0, 2, 1), (1, 2), 2, 2, 5, 9, 8),
    (12, 9, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 3, 4, 3, 5, 5),
    (4, 4, (5, 5), (3, 2), (2, 2, 2, 2), (1, 1), 4, 1, 3, 11, 10),  # depthwise, dsub 1
    (5, 7, (2, 3), (1, 2), (0, 1, 1, 0), (2, 1), 1, 5, 16, 6, 7),
    (6, 4, (3, 3), (1, 1), (0, 2, 1, 0), (2, 2), 2, 3, 4, 8, 9),  # stride 1, dilated: runs past the last table
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_kernels_match_float_conv_with_decoded_weights(case):
    C_in, C_out, kernel, strides, pads, dil, group, dsub, K, H, W = case
    rng = np.random.default_rng(sum(case[:2]) + K)
    w = rng.normal(size=(C_out, C_in // group, *kernel)).astype(np.float32)
    b = rng.normal(size=C_out).astype(np.float32)
    pq = train_kmeans(w, b, dsub=dsub, K=K, group=group, seed=1)
    x = rng.normal(size=(3, C_in, H, W)).astype(np.float32)
    want = conv_float(x, pq.decode().reshape(w.shape), pq.bias, strides, pads, dil, group)
    args = (x, pq.codebook, pq.codes, pq.bias, kernel, strides, pads, dil, group)
    ref = kernels.pq_conv_ref(*args)
    fast = kernels.pq_conv(*args)
    assert ref.shape == fast.shape == want.shape
    np.testing.assert_allclose(ref, want, **TOL)
    np.testing.assert_allclose(fast, want, **TOL)


@pytest.mark.parametrize("C_s,C_t,dsub,K", [(12, 7, 4, 4), (15, 10, 5, 6), (9, 33, 1, 16), (64, 3, 16, 2)])
def test_gemm_kernels_match_matmul_with_decoded_weights(C_s, C_t, dsub, K):
    rng = np.random.default_rng(C_s * C_t)
    w = rng.normal(size=(C_t, C_s)).astype(np.float32)
    b = rng.normal(size=C_t).astype(np.float32)
    pq = train_kmeans(w, b, dsub=dsub, K=min(K, C_t), seed=2)
    x = rng.normal(size=(70, C_s)).astype(np.float32)
    want = x.astype(np.float64) @ pq.decode()[:, :, 0].T.astype(np.float64) + pq.bias
    np.testing.assert_allclose(kernels.pq_gemm_ref(x, pq.codebook, pq.codes, pq.bias), want, **TOL)
    for n in (1, 5, 70):  # per-sample kernel, one partial 32-sample block, two full blocks and a partial one
        np.testing.assert_allclose(kernels.pq_gemm(x[:n], pq.codebook, pq.codes, pq.bias), want[:n], **TOL)


def test_decode_places_codewords_by_tap_subspace_and_group():
    # group 2, M_g 1, dsub 2, 2 taps, 4 outputs: weight[o, :, s] must be codebook[g(o), codes[s, 0, o]]
    codebook = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    codes = np.array([[[0, 1, 2, 0]], [[2, 2, 1, 0]]], np.int32)  # [S=2, M_g=1, C_out=4]
    w = PQWeights(codebook, codes, np.zeros(4), group=2).decode()
    assert w.shape == (4, 2, 2)
    for o in range(4):
        for s in range(2):
            np.testing.assert_array_equal(w[o, :, s], codebook[o // 2, codes[s, 0, o]])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(0, 255), min_size=0, max_size=200))
def test_pack_unpack_round_trip(nbits, values):
    codes = np.array([v % (1 << nbits) for v in values], np.int64)
    packed = pack_codes(codes, nbits)
    assert packed.dtype == np.uint8 and packed.size == (codes.size * nbits + 7) // 8
    np.testing.assert_array_equal(unpack_codes(packed, codes.size, nbits), codes)
    np.testing.assert_array_equal(kernels.unpack_codes_nb(packed, codes.size, nbits), codes)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_codes(np.array([1, 8]), 3)


def test_kernels_reject_mismatched_shapes():
    rng = np.random.default_rng(0)
    pq = train_kmeans(rng.normal(size=(6, 8)).astype(np.float32), np.zeros(6), dsub=4, K=2)
    with pytest.raises(ValueError, match=r"expected x \[N, 8\]"):
        kernels.pq_gemm(np.zeros((2, 9), np.float32), pq.codebook, pq.codes, pq.bias)
    with pytest.raises(ValueError, match="dsub=3 must divide"):
        train_kmeans(np.zeros((6, 8), np.float32), np.zeros(6), dsub=3, K=2)
