"""Product quantization of conv and FC weights: k-means codebooks, decoding, code bit-packing.

Vocabulary (faiss): a layer's input dims (conv: input channels of a group)
are split into ``M`` subspaces of ``dsub`` dims; each subspace has a
sub-codebook of ``K`` (ksub) codewords; every weight sub-vector is replaced by
the index ("code") of a codeword, stored in ``nbits = ceil(log2 K)`` bits
(``pack_codes``) or, for K <= 16, in the native kernel's blocked 4-bit layout
(``pack_fastscan4``; edge_workers/qcnn/fastscan.py).

A fully connected layer is handled as a 1x1 convolution with one tap, so one
representation serves both: ``PQWeights`` holds

* ``codebook``: float32 [M, K, dsub], with M = group * M_g (subspaces of all groups,
  group-major; subspace ``g * M_g + j`` covers channels ``j*dsub:(j+1)*dsub`` of group g),
* ``codes``: int32 [S, M_g, C_out], one code per (tap, subspace of the output's group,
  output channel); S = kernel_h * kernel_w taps (1 for FC), tap ``s = a * kernel_w + b``,
* ``bias``: float32 [C_out].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def nbits_for(K: int) -> int:
    """Bits per code for a K-codeword sub-codebook: ceil(log2 K), at least 1."""
    if K < 2:
        raise ValueError(f"K (codewords per subspace) must be >= 2, got {K}")
    return max(1, math.ceil(math.log2(K)))


def pack_codes(codes: np.ndarray, nbits: int) -> np.ndarray:
    """Bit-pack integer codes (C order) into a little-endian bit stream.

    Code i occupies stream bits [i*nbits, (i+1)*nbits), least significant bit
    first; stream bit j is bit (j % 8) of byte j // 8.
    codes: integer [...] in [0, 2**nbits). Returns uint8 [ceil(codes.size * nbits / 8)].
    """
    flat = np.ascontiguousarray(codes).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << nbits)):
        raise ValueError(f"codes must be in [0, {1 << nbits}) for nbits={nbits}, got [{flat.min()}, {flat.max()}]")
    bits = ((flat[:, None] >> np.arange(nbits)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, n: int, nbits: int) -> np.ndarray:
    """Inverse of pack_codes: uint8 [>= ceil(n*nbits/8)] -> int32 [n]."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    need = (n * nbits + 7) // 8
    if packed.size < need:
        raise ValueError(f"{n} codes of {nbits} bits need {need} bytes, got {packed.size}")
    bits = np.unpackbits(packed, bitorder="little")[: n * nbits].reshape(n, nbits).astype(np.int32)
    return bits @ (1 << np.arange(nbits, dtype=np.int32))


FASTSCAN_MAX_K = 16  # codewords a 4-bit fastscan4 code can name
FASTSCAN_BLOCK = 32  # outputs per fastscan4 code block (16 bytes, two nibbles each)


def padded_subspaces(n: int) -> int:
    """Mp: subspaces per scan padded to a multiple of 4 (AVX-512 reads four 16-byte rows at once)."""
    return -(-n // 4) * 4


def pack_fastscan4(codes: np.ndarray, group: int = 1) -> np.ndarray:
    """codes int [S, M_g, C_out] in [0, 16) -> uint8 [group, ceil(C_out/group/32), Mp, 16]
    (layout: docs/qcnn-format.md)."""
    codes = np.asarray(codes)
    if codes.ndim != 3 or codes.shape[2] % group:
        raise ValueError(f"expected codes [S, M_g, C_out] with group={group} dividing C_out, got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= FASTSCAN_MAX_K):
        raise ValueError(f"fastscan4 codes must be in [0, {FASTSCAN_MAX_K}), got [{codes.min()}, {codes.max()}]")
    S, Mg, C_out = codes.shape
    Cog, Mp = C_out // group, padded_subspaces(S * Mg)
    nblk = -(-Cog // FASTSCAN_BLOCK)
    full = np.zeros((group, nblk * FASTSCAN_BLOCK, Mp), np.uint8)
    full[:, :Cog, :S * Mg] = codes.reshape(S * Mg, group, Cog).transpose(1, 2, 0)
    full = full.reshape(group, nblk, FASTSCAN_BLOCK, Mp)
    packed = full[:, :, :16, :] | (full[:, :, 16:, :] << 4)  # [group, nblk, 16, Mp]
    return np.ascontiguousarray(packed.transpose(0, 1, 3, 2))


def fastscan4_bytes(S: int, Mg: int, C_out: int, group: int) -> int:
    """Size in bytes of the fastscan4 codes of a layer."""
    return group * -(-(C_out // group) // FASTSCAN_BLOCK) * padded_subspaces(S * Mg) * 16


def unpack_fastscan4(packed: np.ndarray, S: int, Mg: int, C_out: int, group: int = 1) -> np.ndarray:
    """Inverse of pack_fastscan4: uint8 [fastscan4_bytes(...)] -> int32 [S, M_g, C_out]."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    need = fastscan4_bytes(S, Mg, C_out, group)
    if packed.size != need:
        raise ValueError(f"fastscan4 codes of S={S} M_g={Mg} C_out={C_out} group={group} are {need} bytes, "
                         f"got {packed.size}")
    Cog, Mp = C_out // group, padded_subspaces(S * Mg)
    p = packed.reshape(group, -1, Mp, 16).transpose(0, 1, 3, 2)  # [group, nblk, 16, Mp]
    full = np.concatenate([p & 15, p >> 4], axis=2).reshape(group, -1, Mp)[:, :Cog, :S * Mg]  # [group, Cog, S*Mg]
    return np.ascontiguousarray(full.transpose(2, 0, 1).reshape(S, Mg, C_out), dtype=np.int32)


def weight_taps(weight: np.ndarray) -> np.ndarray:
    """Conv weight float32 [C_out, C_in/group, kh, kw] or FC weight [C_t, C_s] -> [C_out, C_in/group, S]."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.ndim == 2:
        return w[:, :, None]
    if w.ndim == 4:
        return w.reshape(w.shape[0], w.shape[1], -1)
    raise ValueError(f"expected a weight [C_out, C_in] or [C_out, C_in/group, kh, kw], got shape {w.shape}")


@dataclass
class PQWeights:
    """One layer's product-quantized weights (see the module docstring for the layout)."""

    codebook: np.ndarray  # float32 [M, K, dsub]
    codes: np.ndarray  # int32 [S, M_g, C_out]
    bias: np.ndarray  # float32 [C_out]
    group: int = 1

    def __post_init__(self) -> None:
        self.codebook = np.ascontiguousarray(self.codebook, dtype=np.float32)
        self.codes = np.ascontiguousarray(self.codes, dtype=np.int32)
        self.bias = np.ascontiguousarray(self.bias, dtype=np.float32)
        if self.codebook.ndim != 3 or self.codes.ndim != 3:
            raise ValueError(f"expected codebook [M, K, dsub] and codes [S, M_g, C_out], got "
                             f"{self.codebook.shape} and {self.codes.shape}")
        if self.M != self.group * self.Mg:
            raise ValueError(f"codebook has M={self.M} subspaces, expected group*M_g = {self.group}*{self.Mg}")
        if self.C_out % self.group or self.bias.shape != (self.C_out,):
            raise ValueError(f"expected bias [{self.C_out}] with C_out divisible by group={self.group}, "
                             f"got bias {self.bias.shape}")

    M = property(lambda self: self.codebook.shape[0])
    K = property(lambda self: self.codebook.shape[1])
    dsub = property(lambda self: self.codebook.shape[2])
    S = property(lambda self: self.codes.shape[0])
    Mg = property(lambda self: self.codes.shape[1])
    C_out = property(lambda self: self.codes.shape[2])
    nbits = property(lambda self: nbits_for(self.K))

    @property
    def code_size(self) -> int:
        """Bytes of the bit-packed codes."""
        return (self.codes.size * self.nbits + 7) // 8

    def nbytes(self, codebook_itemsize: int = 2) -> int:
        """Stored bytes: codebook and bias at `codebook_itemsize` bytes per value, plus packed codes."""
        return (self.codebook.size + self.bias.size) * codebook_itemsize + self.code_size

    def global_subspace(self) -> np.ndarray:
        """int32 [M_g, C_out]: codebook row (global subspace) used by (subspace j, output o)."""
        group_of = np.arange(self.C_out) // (self.C_out // self.group)
        return (group_of[None, :] * self.Mg + np.arange(self.Mg)[:, None]).astype(np.int32)

    def decode(self) -> np.ndarray:
        """Reconstructed weights float32 [C_out, C_in/group, S] (tap-last)."""
        sub = self.codebook[self.global_subspace()[None, :, :], self.codes]  # [S, M_g, C_out, dsub]
        return np.ascontiguousarray(sub.transpose(2, 1, 3, 0).reshape(self.C_out, self.Mg * self.dsub, self.S))

    def rounded(self, dtype: str) -> PQWeights:
        """Copy with codebook and bias rounded to `dtype` storage precision ("float16" or "float32")."""
        def cast(a: np.ndarray) -> np.ndarray:
            return a.astype(dtype).astype(np.float32)

        return PQWeights(cast(self.codebook), self.codes.copy(), cast(self.bias), self.group)


def train_kmeans(weight: np.ndarray, bias: np.ndarray, dsub: int, K: int, group: int = 1,
                 seed: int = 0, n_init: int = 4, max_iter: int = 300, threads: int = 1) -> PQWeights:
    """Learn sub-codebooks by k-means (scikit-learn, k-means++ init) over a layer's weight sub-vectors.

    weight: float32 [C_out, C_in/group, kh, kw] (conv) or [C_t, C_s] (FC); bias: float32 [C_out].
    Each subspace's k-means runs over the (C_out/group) * S sub-vectors of dimension dsub
    that fall into it (all taps share the codebook), with `n_init` restarts of at most
    `max_iter` Lloyd iterations. The fits are small, so each runs single-threaded (one
    threadpoolctl limit for the whole call, not one per fit) and `threads` fits run side by
    side; every fit has its own seed, so the result does not depend on `threads`.
    Raises ValueError when dsub does not divide C_in/group or a subspace has fewer than K sub-vectors.
    """
    from concurrent.futures import ThreadPoolExecutor

    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    w = weight_taps(weight)
    C_out, Cg, S = w.shape
    if Cg % dsub:
        raise ValueError(f"dsub={dsub} must divide the input dims per group, got {Cg}")
    if C_out % group:
        raise ValueError(f"group={group} must divide C_out={C_out}")
    if min(n_init, max_iter, threads) < 1:
        raise ValueError(f"n_init, max_iter and threads must be >= 1, got {n_init}, {max_iter}, {threads}")
    Mg, Cog = Cg // dsub, C_out // group
    if Cog * S < K:
        raise ValueError(f"K={K} codewords need at least {K} sub-vectors per subspace, layer has {Cog * S}")
    codebook = np.empty((group * Mg, K, dsub), np.float32)
    codes = np.empty((S, Mg, C_out), np.int32)

    def fit(m: int) -> None:  # global subspace m = g * Mg + j
        g, j = divmod(m, Mg)
        sub = w[g * Cog:(g + 1) * Cog, j * dsub:(j + 1) * dsub, :]  # [Cog, dsub, S]
        points = sub.transpose(2, 0, 1).reshape(S * Cog, dsub).astype(np.float64)
        km = KMeans(n_clusters=K, n_init=n_init, max_iter=max_iter, random_state=seed + 7919 * m).fit(points)
        codebook[m] = km.cluster_centers_
        codes[:, j, g * Cog:(g + 1) * Cog] = km.labels_.reshape(S, Cog)

    with threadpool_limits(1):
        if threads == 1:
            for m in range(group * Mg):
                fit(m)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(fit, range(group * Mg)))
    return PQWeights(codebook, codes, np.asarray(bias, np.float32).copy(), group)
