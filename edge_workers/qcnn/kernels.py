"""Q-CNN test-phase kernels: lookup tables of input/codeword inner products, summed by code.

Two implementations with one signature each: numba-compiled (``pq_gemm``,
``pq_conv``, what the runtime uses) and plain numpy references
(``pq_gemm_ref``, ``pq_conv_ref``, kept for tests). Layouts follow
:mod:`edge_workers.qcnn.pq`: codebook float32 [M, K, dsub], codes int32
[S, M_g, C_out], bias float32 [C_out].

FC:   lut[n, m, k] = <x[n, m*dsub:(m+1)*dsub], codebook[m, k]>;  y[n, t] = bias[t] + sum_m lut[n, m, codes[0, m, t]]
Conv: one table per input position, lut[h, w, m, k]; y[n, o, oh, ow] = bias[o] + sum over taps (a, b) inside
      the (padded) input and subspaces j of o's group g of lut[ih, iw, g*M_g + j, codes[a*kw + b, j, o]].
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


def conv_out_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int) -> int:
    """Output length of a convolution along one axis."""
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def _check(x: np.ndarray, codebook: np.ndarray, codes: np.ndarray, bias: np.ndarray, ndim: int):
    x = np.ascontiguousarray(x, dtype=np.float32)
    codebook = np.ascontiguousarray(codebook, dtype=np.float32)
    codes = np.ascontiguousarray(codes, dtype=np.int32)
    bias = np.ascontiguousarray(bias, dtype=np.float32)
    if x.ndim != ndim or codebook.ndim != 3 or codes.ndim != 3:
        raise ValueError(f"expected x with {ndim} dims, codebook [M, K, dsub], codes [S, M_g, C_out]; got "
                         f"x {x.shape}, codebook {codebook.shape}, codes {codes.shape}")
    if bias.shape != (codes.shape[2],):
        raise ValueError(f"expected bias [{codes.shape[2]}], got {bias.shape}")
    return x, codebook, codes, bias


# ---------------------------------------------------------------- numpy references


def pq_gemm_ref(x, codebook, codes, bias) -> np.ndarray:
    """x: float32 [N, C_s] -> float32 [N, C_t]; codes [1, M, C_t]."""
    x, codebook, codes, bias = _check(x, codebook, codes, bias, 2)
    M, K, dsub = codebook.shape
    if x.shape[1] != M * dsub or codes.shape[:2] != (1, M):
        raise ValueError(f"expected x [N, {M * dsub}] and codes [1, {M}, C_t], got {x.shape} and {codes.shape}")
    lut = np.einsum("nmd,mkd->nmk", x.reshape(len(x), M, dsub), codebook)
    picked = lut[:, np.arange(M)[:, None], codes[0]]  # [N, M, C_t]
    return (bias + picked.sum(axis=1)).astype(np.float32)


def pq_conv_ref(x, codebook, codes, bias, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                group=1) -> np.ndarray:
    """x: float32 [N, C_in, H, W] -> float32 [N, C_out, OH, OW]; pads (top, left, bottom, right)."""
    x, codebook, codes, bias = _check(x, codebook, codes, bias, 4)
    N, C, H, W = x.shape
    M, K, dsub = codebook.shape
    S, Mg, C_out = codes.shape
    kh, kw = kernel
    if C != M * dsub or M != group * Mg or S != kh * kw:
        raise ValueError(f"expected x with C_in = M*dsub = {M * dsub} channels, M = group*M_g, S = kh*kw = "
                         f"{kh * kw}; got x {x.shape}, codebook {codebook.shape}, codes {codes.shape}")
    OH = conv_out_size(H, kh, strides[0], pads[0], pads[2], dilations[0])
    OW = conv_out_size(W, kw, strides[1], pads[1], pads[3], dilations[1])
    lut = np.einsum("nmdhw,mkd->nhwmk", x.reshape(N, M, dsub, H, W), codebook)
    lut = np.pad(lut, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0), (0, 0)))
    msub = (np.arange(C_out) // (C_out // group))[None, :] * Mg + np.arange(Mg)[:, None]  # [M_g, C_out]
    y = np.zeros((N, OH, OW, C_out), np.float32)
    for a in range(kh):
        for b in range(kw):
            h0, w0 = a * dilations[0], b * dilations[1]
            win = lut[:, h0:h0 + strides[0] * (OH - 1) + 1:strides[0], w0:w0 + strides[1] * (OW - 1) + 1:strides[1]]
            y += win[:, :, :, msub, codes[a * kw + b]].sum(axis=3)
    return np.ascontiguousarray((y + bias).transpose(0, 3, 1, 2))


# ---------------------------------------------------------------- numba


@njit(cache=True)
def unpack_codes_nb(packed, n, nbits):
    """uint8 little-endian bit stream -> int32 [n] (same layout as pq.pack_codes)."""
    out = np.empty(n, np.int32)
    for i in range(n):
        v = 0
        base = i * nbits
        for j in range(nbits):
            bit = base + j
            v |= ((packed[bit >> 3] >> (bit & 7)) & 1) << j
        out[i] = v
    return out


@njit(cache=True, parallel=True)
def _gemm_nb(x, codebook, codes_t, bias):
    N, Cs = x.shape
    M, K, dsub = codebook.shape
    Ct = codes_t.shape[0]
    y = np.empty((N, Ct), np.float32)
    for n in prange(N):
        lut = np.empty((M, K), np.float32)
        for m in range(M):
            for k in range(K):
                acc = np.float32(0.0)
                for d in range(dsub):
                    acc += x[n, m * dsub + d] * codebook[m, k, d]
                lut[m, k] = acc
        for t in range(Ct):
            acc = bias[t]
            for m in range(M):
                acc += lut[m, codes_t[t, m]]
            y[n, t] = acc
    return y


@njit(cache=True, parallel=True)
def _conv_nb(x, codebook, codes_o, bias, kh, kw, sh, sw, pt, pl, dh, dw, group, OH, OW):
    N, C, H, W = x.shape
    M, K, dsub = codebook.shape
    C_out, S, Mg = codes_o.shape
    Cog = C_out // group
    y = np.empty((N, C_out, OH, OW), np.float32)
    for n in prange(N):
        lut = np.empty((H, W, M, K), np.float32)
        for h in range(H):
            for w in range(W):
                for m in range(M):
                    for k in range(K):
                        acc = np.float32(0.0)
                        for d in range(dsub):
                            acc += x[n, m * dsub + d, h, w] * codebook[m, k, d]
                        lut[h, w, m, k] = acc
        for o in range(C_out):
            m0 = (o // Cog) * Mg
            for oh in range(OH):
                for ow in range(OW):
                    acc = bias[o]
                    for a in range(kh):
                        ih = oh * sh - pt + a * dh
                        if ih < 0 or ih >= H:
                            continue
                        for b in range(kw):
                            iw = ow * sw - pl + b * dw
                            if iw < 0 or iw >= W:
                                continue
                            s = a * kw + b
                            for j in range(Mg):
                                acc += lut[ih, iw, m0 + j, codes_o[o, s, j]]
                    y[n, o, oh, ow] = acc
    return y


def pq_gemm(x, codebook, codes, bias) -> np.ndarray:
    """numba version of pq_gemm_ref: x float32 [N, C_s] -> float32 [N, C_t]."""
    x, codebook, codes, bias = _check(x, codebook, codes, bias, 2)
    M, K, dsub = codebook.shape
    if x.shape[1] != M * dsub or codes.shape[:2] != (1, M):
        raise ValueError(f"expected x [N, {M * dsub}] and codes [1, {M}, C_t], got {x.shape} and {codes.shape}")
    return _gemm_nb(x, codebook, np.ascontiguousarray(codes[0].T), bias)


def pq_conv(x, codebook, codes, bias, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
            group=1) -> np.ndarray:
    """numba version of pq_conv_ref: x float32 [N, C_in, H, W] -> float32 [N, C_out, OH, OW]."""
    x, codebook, codes, bias = _check(x, codebook, codes, bias, 4)
    N, C, H, W = x.shape
    M, K, dsub = codebook.shape
    S, Mg, C_out = codes.shape
    kh, kw = kernel
    if C != M * dsub or M != group * Mg or S != kh * kw:
        raise ValueError(f"expected x with C_in = M*dsub = {M * dsub} channels, M = group*M_g, S = kh*kw = "
                         f"{kh * kw}; got x {x.shape}, codebook {codebook.shape}, codes {codes.shape}")
    OH = conv_out_size(H, kh, strides[0], pads[0], pads[2], dilations[0])
    OW = conv_out_size(W, kw, strides[1], pads[1], pads[3], dilations[1])
    if OH < 1 or OW < 1:
        raise ValueError(f"input {H}x{W} too small for kernel {kh}x{kw} with pads {pads}: output {OH}x{OW}")
    codes_o = np.ascontiguousarray(codes.transpose(2, 0, 1))  # [C_out, S, M_g]
    return _conv_nb(x, codebook, codes_o, bias, kh, kw, strides[0], strides[1], pads[0], pads[1],
                    dilations[0], dilations[1], group, OH, OW)
