"""Q-CNN test-phase kernels: lookup tables of input/codeword inner products, summed by code.

Two implementations with one signature each: numba-compiled (``pq_gemm``,
``pq_conv``, what the runtime uses) and plain numpy references
(``pq_gemm_ref``, ``pq_conv_ref``, kept for tests). Layouts follow
:mod:`edge_workers.qcnn.pq`: codebook float32 [M, K, dsub], codes int32
[S, M_g, C_out], bias float32 [C_out].

FC:   lut[n, m, k] = <x[n, m*dsub:(m+1)*dsub], codebook[m, k]>;  y[n, t] = bias[t] + sum_m lut[n, m, codes[0, m, t]]
Conv: one table per input position, lut[h, w, m, k]; y[n, o, oh, ow] = bias[o] + sum over taps (a, b) inside
      the (padded) input and subspaces j of o's group g of lut[ih, iw, g*M_g + j, codes[a*kw + b, j, o]].

The runtime prepares a layer once (``PQConv`` / ``PQGemm``: codes in kernel layout) and calls
``apply`` per batch; ``pq_conv`` / ``pq_gemm`` prepare and apply in one call.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange


def conv_out_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int) -> int:
    """Output length of a convolution along one axis."""
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def _check_params(codebook: np.ndarray, codes: np.ndarray, bias: np.ndarray):
    codebook = np.ascontiguousarray(codebook, dtype=np.float32)
    codes = np.ascontiguousarray(codes, dtype=np.int32)
    bias = np.ascontiguousarray(bias, dtype=np.float32)
    if codebook.ndim != 3 or codes.ndim != 3:
        raise ValueError(f"expected codebook [M, K, dsub], codes [S, M_g, C_out]; got codebook {codebook.shape}, "
                         f"codes {codes.shape}")
    if bias.shape != (codes.shape[2],):
        raise ValueError(f"expected bias [{codes.shape[2]}], got {bias.shape}")
    return codebook, codes, bias


def _check(x: np.ndarray, codebook: np.ndarray, codes: np.ndarray, bias: np.ndarray, ndim: int):
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != ndim:
        raise ValueError(f"expected x with {ndim} dims, got x {x.shape}")
    return (x, *_check_params(codebook, codes, bias))


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
#
# Layouts chosen so the innermost loops are contiguous float32 runs LLVM vectorizes:
# * conv, per sample: one zero-padded table set lut float32 [M, K, H_pad, W_pad] (flat); for
#   stride 1 each output channel sums, per (tap, subspace), one contiguous run of OH*W_pad floats of
#   the table its code names (the W_pad - OW extra columns per row are computed and dropped), four
#   runs per pass over the accumulator. Other strides walk rows of OW strided floats.
# * FC: samples innermost for blocks of up to 32 samples, lut float32 [M, K, B], each code adding a
#   row of B floats; fewer than 4 samples go one by one (lut [M, K], scalar gathers).
# * Codes are unpacked and transposed once per layer (PQConv / PQGemm below), not per call.
# * Slices are taken before indexing (`src = lut[a:b]; src[i]`): an index from range() is known
#   non-negative, `lut[base + i]` is not, and numba's negative-index wraparound blocks vectorization
#   (measured 10x on the conv sum).
# * Serial drivers run when numba has 1 thread or there is one item: a prange launch costs microseconds
#   when idle and milliseconds when the OpenMP workers spin on a shared, busy host.

_FC_BLOCK = 32  # samples per FC block: lut [M, K, 32] float32 stays in L1/L2 for typical M*K


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


@njit(cache=True, fastmath=True)
def _fc_rows(x, codebook, codes_t, bias, n0, n1, y):
    """y[n0:n1] of the FC layer; blocks of 4+ samples run samples-innermost (lut [M, K, B], y^T rows)."""
    Cs = x.shape[1]
    M, K, dsub = codebook.shape
    Ct = codes_t.shape[0]
    B = n1 - n0
    if B < 4:  # too few samples to fill a vector: per sample, lut [M, K] by d-contiguous dot products
        lut1 = np.empty((M, K), np.float32)
        for n in range(n0, n1):
            for m in range(M):
                for k in range(K):
                    acc = np.float32(0.0)
                    for d in range(dsub):
                        acc += x[n, m * dsub + d] * codebook[m, k, d]
                    lut1[m, k] = acc
            for t in range(Ct):
                acc = bias[t]
                for m in range(M):
                    acc += lut1[m, codes_t[t, m]]
                y[n, t] = acc
        return
    xt = np.empty((Cs, B), np.float32)
    for i in range(B):
        for c in range(Cs):
            xt[c, i] = x[n0 + i, c]
    lut = np.zeros((M, K, B), np.float32)
    for m in range(M):
        for k in range(K):
            row = lut[m, k]
            for d in range(dsub):
                cw = codebook[m, k, d]
                xr = xt[m * dsub + d]
                for i in range(B):
                    row[i] += cw * xr[i]
    yt = np.empty(B, np.float32)
    for t in range(Ct):
        yt[:] = bias[t]
        for m in range(M):
            row = lut[m, codes_t[t, m]]
            for i in range(B):
                yt[i] += row[i]
        for i in range(B):
            y[n0 + i, t] = yt[i]


# Serial and parallel drivers are separate functions on purpose: one Python function jitted twice
# with cache=True shares one cache entry, and the serial dispatcher then loads the parallel code.
@njit(cache=True)
def _fc_serial(x, codebook, codes_t, bias, block):
    y = np.empty((x.shape[0], codes_t.shape[0]), np.float32)
    for blk in range((x.shape[0] + block - 1) // block):
        _fc_rows(x, codebook, codes_t, bias, blk * block, min(x.shape[0], (blk + 1) * block), y)
    return y


@njit(cache=True, parallel=True)
def _fc_parallel(x, codebook, codes_t, bias, block):
    y = np.empty((x.shape[0], codes_t.shape[0]), np.float32)
    for blk in prange((x.shape[0] + block - 1) // block):
        _fc_rows(x, codebook, codes_t, bias, blk * block, min(x.shape[0], (blk + 1) * block), y)
    return y


@njit(cache=True, fastmath=True)
def _conv_lut(xn, codebook, pt, pl, pb, pr, lut):
    """lut float32 flat [M, K, H+pt+pb, W+pl+pr] (+ slack), zero border:
    <x[m*dsub:(m+1)*dsub, h, w], codebook[m, k]>."""
    H, W = xn.shape[1:]
    M, K, dsub = codebook.shape
    Wp = W + pl + pr
    P = (H + pt + pb) * Wp
    lut[:] = 0.0
    for m in range(M):
        for d in range(dsub):
            xp = xn[m * dsub + d]
            for k in range(K):
                cw = codebook[m, k, d]
                base = (m * K + k) * P + pt * Wp + pl
                if Wp == W:  # no left/right padding: the H rows are one contiguous run
                    dst = lut[base:base + H * W]  # slice views: indices from range() are known >= 0, so
                    src = xp.ravel()              # LLVM drops the negative-index wraparound and vectorizes
                    for i in range(H * W):
                        dst[i] += cw * src[i]
                else:
                    for h in range(H):
                        dst = lut[base + h * Wp:base + h * Wp + W]
                        for w in range(W):
                            dst[w] += cw * xp[h, w]


@njit(cache=True, fastmath=True)
def _conv_sum_unit(lut, offsets, bias_o, acc):
    """Stride 1: acc[i] = bias_o + sum_t lut[offsets[t] + i], i < acc.size; four tables per pass over acc."""
    run = acc.size
    T = offsets.size
    acc[:] = bias_o
    t = 0
    while t + 4 <= T:
        s0 = lut[offsets[t]:offsets[t] + run]
        s1 = lut[offsets[t + 1]:offsets[t + 1] + run]
        s2 = lut[offsets[t + 2]:offsets[t + 2] + run]
        s3 = lut[offsets[t + 3]:offsets[t + 3] + run]
        for i in range(run):
            acc[i] += (s0[i] + s1[i]) + (s2[i] + s3[i])
        t += 4
    while t < T:
        s0 = lut[offsets[t]:offsets[t] + run]
        for i in range(run):
            acc[i] += s0[i]
        t += 1


@njit(cache=True, fastmath=True)
def _conv_sample(xn, codebook, codes_o, bias, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, group, yn):
    """yn float32 [C_out, OH, OW] = the PQ convolution of one sample xn float32 [C_in, H, W]."""
    H, W = xn.shape[1:]
    C_out, OH, OW = yn.shape
    M, K = codebook.shape[:2]
    S, Mg = codes_o.shape[1:]
    Cog = C_out // group
    Wp = W + pl + pr
    P = (H + pt + pb) * Wp
    unit = sh == 1 and sw == 1
    # Stride 1: output row oh, tap (a, b) reads table row oh + a*dh from column b*dw on; computing all Wp
    # columns of each output row (the last Wp - OW are dropped) makes one contiguous run of OH*Wp per
    # (tap, subspace), starting at offset a*dh*Wp + b*dw of its table.
    run = OH * Wp
    slack = (kw - 1) * dw  # the run of the last table reads this far past it
    lut = np.empty(M * K * P + slack, np.float32)
    _conv_lut(xn, codebook, pt, pl, pb, pr, lut)
    acc = np.empty(run if unit else OH * OW, np.float32)
    offsets = np.empty(S * Mg, np.int64)
    for o in range(C_out):
        m0 = (o // Cog) * Mg
        if unit:
            for a in range(kh):
                for b in range(kw):
                    s = a * kw + b
                    for j in range(Mg):
                        offsets[s * Mg + j] = ((m0 + j) * K + codes_o[o, s, j]) * P + a * dh * Wp + b * dw
            _conv_sum_unit(lut, offsets, bias[o], acc)
            for oh in range(OH):
                for ow in range(OW):
                    yn[o, oh, ow] = acc[oh * Wp + ow]
            continue
        acc[:] = bias[o]
        for a in range(kh):
            for b in range(kw):
                s = a * kw + b
                for j in range(Mg):
                    table = ((m0 + j) * K + codes_o[o, s, j]) * P
                    for oh in range(OH):
                        base = table + (oh * sh + a * dh) * Wp + b * dw
                        src = lut[base:base + (OW - 1) * sw + 1:sw]
                        dst = acc[oh * OW:(oh + 1) * OW]
                        for ow in range(OW):
                            dst[ow] += src[ow]
        for oh in range(OH):
            for ow in range(OW):
                yn[o, oh, ow] = acc[oh * OW + ow]


@njit(cache=True)
def _conv_serial(x, codebook, codes_o, bias, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, group, OH, OW):
    y = np.empty((x.shape[0], codes_o.shape[0], OH, OW), np.float32)
    for n in range(x.shape[0]):
        _conv_sample(x[n], codebook, codes_o, bias, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, group, y[n])
    return y


@njit(cache=True, parallel=True)
def _conv_parallel(x, codebook, codes_o, bias, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, group, OH, OW):
    y = np.empty((x.shape[0], codes_o.shape[0], OH, OW), np.float32)
    for n in prange(x.shape[0]):
        _conv_sample(x[n], codebook, codes_o, bias, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, group, y[n])
    return y


def _parallel(n_items: int) -> bool:
    return n_items > 1 and numba.get_num_threads() > 1


def code_dtype(K: int) -> np.dtype:
    """Smallest unsigned type holding codes in [0, K)."""
    return np.dtype(np.uint8 if K <= 256 else np.uint16 if K <= 65536 else np.uint32)


class PQGemm:
    """A PQ fully connected layer prepared once (codes transposed to [C_t, M]); `apply` runs it.

    codebook float32 [M, K, dsub], codes int [1, M, C_t], bias float32 [C_t].
    """

    def __init__(self, codebook, codes, bias):
        self.codebook, codes, self.bias = _check_params(codebook, codes, bias)
        self.M, self.K, self.dsub = self.codebook.shape
        if codes.shape[:2] != (1, self.M):
            raise ValueError(f"expected codes [1, {self.M}, C_t], got {codes.shape}")
        self.codes_t = np.ascontiguousarray(codes[0].T, dtype=code_dtype(self.K))  # [C_t, M]

    def apply(self, x) -> np.ndarray:
        """x: float32 [N, M*dsub] -> float32 [N, C_t]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.M * self.dsub:
            raise ValueError(f"expected x [N, {self.M * self.dsub}], got {x.shape}")
        N = x.shape[0]
        block = _FC_BLOCK if N >= 2 * _FC_BLOCK or not _parallel(N) else (N + 1) // 2  # both threads busy
        fn = _fc_parallel if _parallel((N + block - 1) // block) else _fc_serial
        return fn(x, self.codebook, self.codes_t, self.bias, block)


class PQConv:
    """A PQ convolution prepared once (codes as [C_out, S, M_g]); `apply` runs it.

    codebook float32 [M, K, dsub], codes int [S, M_g, C_out], bias float32 [C_out];
    pads (top, left, bottom, right).
    """

    def __init__(self, codebook, codes, bias, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                 group=1):
        self.codebook, codes, self.bias = _check_params(codebook, codes, bias)
        M, K, dsub = self.codebook.shape
        S, Mg, C_out = codes.shape
        self.kernel, self.strides, self.pads, self.dilations = tuple(kernel), tuple(strides), tuple(pads), \
            tuple(dilations)
        self.group = int(group)
        if M != self.group * Mg or S != kernel[0] * kernel[1] or C_out % self.group:
            raise ValueError(f"expected M = group*M_g, S = kh*kw = {kernel[0] * kernel[1]}, group | C_out; got "
                             f"codebook {self.codebook.shape}, codes {codes.shape}, group {group}")
        self.in_channels = M * dsub
        self.codes_o = np.ascontiguousarray(codes.transpose(2, 0, 1), dtype=code_dtype(K))  # [C_out, S, M_g]

    def out_size(self, H: int, W: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = self.kernel, self.strides, self.pads, self.dilations
        return conv_out_size(H, kh, sh, pt, pb, dh), conv_out_size(W, kw, sw, pl, pr, dw)

    def check_input(self, x) -> tuple[np.ndarray, int, int]:
        """x as contiguous float32 [N, C_in, H, W] and the output size (OH, OW); ValueError if it does not fit."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x [N, {self.in_channels}, H, W], got {x.shape}")
        H, W = x.shape[2:]
        OH, OW = self.out_size(H, W)
        if OH < 1 or OW < 1:
            raise ValueError(f"input {H}x{W} too small for kernel {self.kernel} with pads {self.pads}: "
                             f"output {OH}x{OW}")
        return x, OH, OW

    def apply(self, x) -> np.ndarray:
        """x: float32 [N, C_in, H, W] -> float32 [N, C_out, OH, OW]."""
        x, OH, OW = self.check_input(x)
        fn = _conv_parallel if _parallel(len(x)) else _conv_serial
        return fn(x, self.codebook, self.codes_o, self.bias, *self.kernel, *self.strides, *self.pads,
                  *self.dilations, self.group, OH, OW)


def from_attrs(op_type: str, codebook, codes, bias, a: dict):
    """PQConv / PQGemm for an ``ai.edgeq`` node: codes int [S, M_g, C_out], `a` its int attributes."""
    if op_type == "PQGemm":
        return PQGemm(codebook, codes, bias)
    return PQConv(codebook, codes, bias, (a["kernel_h"], a["kernel_w"]), (a["stride_h"], a["stride_w"]),
                  (a["pad_top"], a["pad_left"], a["pad_bottom"], a["pad_right"]), (a["dilation_h"], a["dilation_w"]),
                  a["group"])


def pq_gemm(x, codebook, codes, bias) -> np.ndarray:
    """numba version of pq_gemm_ref: x float32 [N, C_s] -> float32 [N, C_t]."""
    return PQGemm(codebook, codes, bias).apply(x)


def pq_conv(x, codebook, codes, bias, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
            group=1) -> np.ndarray:
    """numba version of pq_conv_ref: x float32 [N, C_in, H, W] -> float32 [N, C_out, OH, OW]."""
    return PQConv(codebook, codes, bias, kernel, strides, pads, dilations, group).apply(x)
