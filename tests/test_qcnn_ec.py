"""Error correction: statistics-based response error and block coordinate descent on synthetic layers."""

from __future__ import annotations

import numpy as np

from edge_workers.qcnn import ec
from edge_workers.qcnn.pq import train_kmeans


def _conv_direct(x, w, b, pads):
    """Stride-1 float64 conv of x [N, C, H, W] with w [C_out, C, kh, kw] (group 1)."""
    C_out, C, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    OH, OW = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    y = np.zeros((len(x), C_out, OH, OW))
    for a in range(kh):
        for c in range(kw):
            y += np.einsum("nchw,oc->nohw", xp[:, :, a:a + OH, c:c + OW], w[:, :, a, c])
    return y + b[None, :, None, None]


def test_response_error_from_stats_equals_direct_computation():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 6, 7, 7)).astype(np.float32)
    w = rng.normal(size=(5, 6, 3, 3)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    pads = (1, 1, 1, 1)
    y = _conv_direct(x, w, b, pads).astype(np.float32)
    rows = ec.sample_rows(20, 7, 7, 10 ** 6, rng)
    stats = ec.stats_from_rows(ec.im2col_rows(x, (3, 3), (1, 1), pads, (1, 1), rows),
                               y[rows[:, 0], :, rows[:, 1], rows[:, 2]], 1)
    pq = train_kmeans(w, b, dsub=2, K=4)
    w_hat, b_hat = pq.decode().reshape(w.shape), pq.bias + 0.1
    y_hat = _conv_direct(x, w_hat, b_hat, pads)
    direct = float(((y_hat - y) ** 2).sum() / (y.astype(np.float64) ** 2).sum())
    assert abs(ec.response_error(stats, pq.decode(), b_hat) - direct) < 1e-6 * max(direct, 1.0)
    assert ec.response_error(stats, w.reshape(5, 6, 9), b) < 1e-10  # exact weights: zero error


def test_error_correction_beats_kmeans_on_fc_and_grouped_conv():
    rng = np.random.default_rng(4)
    # FC on correlated inputs: the response-aware fit must beat weight-space k-means clearly.
    mix = rng.normal(size=(24, 24))
    X = (rng.normal(size=(2000, 24)) @ mix).astype(np.float32)
    W = rng.normal(size=(16, 24)).astype(np.float32)
    b = rng.normal(size=16).astype(np.float32)
    stats = ec.stats_from_rows(X[:, None, :], X @ W.T + b, 1)
    km = train_kmeans(W, b, dsub=4, K=4, seed=0)
    fixed = ec.error_correct(stats, km, iters=6)
    e_km = ec.response_error(stats, km.decode(), km.bias)
    e_ec = ec.response_error(stats, fixed.decode(), fixed.bias)
    assert e_ec < 0.7 * e_km  # observed 0.08 vs 0.34
    # grouped conv statistics (group 2, 2x2 taps) through the same code path
    Xc = rng.normal(size=(3000, 4, 8)).astype(np.float32)  # [R, S, C_in]
    Wc = rng.normal(size=(6, 4, 4)).astype(np.float32)  # [C_out, C_in/group, S]
    Yc = np.concatenate([Xc[:, :, 4 * g:4 * g + 4].reshape(3000, -1) @ Wc[3 * g:3 * g + 3].transpose(0, 2, 1)
                         .reshape(3, -1).T for g in range(2)], axis=1)
    stats_c = ec.stats_from_rows(Xc, Yc, 2)
    km_c = train_kmeans(Wc.reshape(6, 4, 2, 2), np.zeros(6), dsub=2, K=3, group=2, seed=0)
    fixed_c = ec.error_correct(stats_c, km_c, iters=6)
    assert (ec.response_error(stats_c, fixed_c.decode(), fixed_c.bias)
            < ec.response_error(stats_c, km_c.decode(), km_c.bias))
    assert fixed_c.codes.max() < 3 and fixed_c.codebook.shape == (4, 3, 2)


def test_chunked_sweep_and_parallel_kmeans_give_the_same_result():
    """EC's chunked products and k-means' side-by-side fits are speed-ups only: same codes and codebooks."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(3000, 9, 8)) @ rng.normal(size=(8, 8))  # [R, S, C_in], correlated channels, 3x3 taps
    W = rng.normal(size=(12, 8, 3, 3)).astype(np.float32)
    stats = ec.stats_from_rows(X, X.reshape(3000, -1) @ W.transpose(0, 2, 3, 1).reshape(12, -1).T, 1)
    km = train_kmeans(W, np.zeros(12), dsub=2, K=4, seed=0)
    km2 = train_kmeans(W, np.zeros(12), dsub=2, K=4, seed=0, threads=2)
    assert np.array_equal(km.codes, km2.codes) and np.array_equal(km.codebook, km2.codebook)
    one = ec.error_correct(stats, km, iters=3, chunk_rows=1)  # one subspace per product: the plain sweep
    chunked = ec.error_correct(stats, km, iters=3, chunk_rows=36)  # two subspaces per product
    assert np.array_equal(one.codes, chunked.codes)
    assert np.allclose(one.codebook, chunked.codebook, rtol=1e-5, atol=1e-6)
    assert ec.response_error(stats, chunked.decode(), chunked.bias) < ec.response_error(stats, km.decode(), km.bias)
