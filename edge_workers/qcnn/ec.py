"""Error correction (Wu et al. 2016, sec. 3.2): fit PQ codes and codebooks to a layer's responses.

Everything works on sufficient statistics of the calibration data, so one
sweep costs O(D^2) per block whatever the number of calibration rows. Per
group, with X the layer input rows (im2col patches for conv, tap-major:
column ``s * C_g + c``) and Y the ORIGINAL network's responses::

    G = X^T X [D, D], XtY = X^T Y [D, C_out/group], xs = sum X [D], ys = sum Y, yy = sum Y^2

D = S * C_in/group. The objective ||X W^T + b - Y||^2 is minimised by block
coordinate descent over subspaces: with the other blocks fixed, each
(tap, subspace) block's codes are re-chosen by exhaustive search over the K
codewords, then the subspace's codebook is refit by least squares over all
outputs and taps assigned to it; the bias is refit in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_workers.qcnn.pq import PQWeights


@dataclass
class ResponseStats:
    """Calibration statistics of one layer, per group (float64)."""

    G: np.ndarray  # [group, D, D]
    XtY: np.ndarray  # [group, D, C_out/group]
    xs: np.ndarray  # [group, D]
    ys: np.ndarray  # [group, C_out/group]
    yy: np.ndarray  # [group, C_out/group]
    n: int  # calibration rows

    @property
    def group(self) -> int:
        return self.G.shape[0]


def im2col_rows(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int],
                dilations: tuple[int, int], rows: np.ndarray) -> np.ndarray:
    """Patches at sampled output positions.

    x: float32 [N, C, H, W]; rows: int [R, 3] of (n, oh, ow); pads (top, left, bottom, right).
    Returns float32 [R, S, C], tap s = a * kernel_w + b.
    """
    kh, kw = kernel
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ih = rows[:, 1:2] * strides[0] + (np.arange(kh) * dilations[0])[None, :]  # [R, kh]
    iw = rows[:, 2:3] * strides[1] + (np.arange(kw) * dilations[1])[None, :]  # [R, kw]
    n = rows[:, 0][:, None, None]
    patches = xp[n, :, ih[:, :, None], iw[:, None, :]]  # [R, kh, kw, C]
    return patches.reshape(len(rows), kh * kw, x.shape[1])


def sample_rows(n: int, oh: int, ow: int, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [R, 3] output positions (n, oh, ow): all of them, or `max_rows` drawn without replacement."""
    total = n * oh * ow
    flat = np.arange(total) if total <= max_rows else np.sort(rng.choice(total, size=max_rows, replace=False))
    return np.stack(np.unravel_index(flat, (n, oh, ow)), axis=1)


def stats_from_rows(X: np.ndarray, Y: np.ndarray, group: int) -> ResponseStats:
    """X: float [R, S, C_in] patches, Y: float [R, C_out] responses -> per-group statistics."""
    R, S, C = X.shape
    Cg, Cog = C // group, Y.shape[1] // group
    Gs, XtYs, xss, yss, yys = [], [], [], [], []
    for g in range(group):
        Xg = X[:, :, g * Cg:(g + 1) * Cg].reshape(R, S * Cg).astype(np.float64)
        Yg = Y[:, g * Cog:(g + 1) * Cog].astype(np.float64)
        Gs.append(Xg.T @ Xg)
        XtYs.append(Xg.T @ Yg)
        xss.append(Xg.sum(0))
        yss.append(Yg.sum(0))
        yys.append((Yg * Yg).sum(0))
    return ResponseStats(np.stack(Gs), np.stack(XtYs), np.stack(xss), np.stack(yss), np.stack(yys), R)


def _group_matrix(w_taps: np.ndarray, g: int, group: int) -> np.ndarray:
    """[C_out, C_g, S] weights -> group g's float64 [C_out/group, S*C_g] (tap-major columns)."""
    Cog = w_taps.shape[0] // group
    wg = w_taps[g * Cog:(g + 1) * Cog]
    return wg.transpose(0, 2, 1).reshape(Cog, -1).astype(np.float64)


def response_error(stats: ResponseStats, w_taps: np.ndarray, bias: np.ndarray) -> float:
    """Relative response error ||X W^T + b - Y||^2 / ||Y||^2 from statistics.

    w_taps: float [C_out, C_in/group, S]; bias: float [C_out].
    """
    err = 0.0
    Cog = w_taps.shape[0] // stats.group
    for g in range(stats.group):
        W = _group_matrix(w_taps, g, stats.group)
        b = np.asarray(bias, np.float64)[g * Cog:(g + 1) * Cog]
        quad = np.einsum("td,td->t", W @ stats.G[g], W)
        err += float(np.sum(quad + 2 * b * (W @ stats.xs[g]) + stats.n * b * b
                            - 2 * np.einsum("td,dt->t", W, stats.XtY[g]) - 2 * b * stats.ys[g] + stats.yy[g]))
    return max(err, 0.0) / max(float(stats.yy.sum()), 1e-30)


def error_correct(stats: ResponseStats, pq: PQWeights, iters: int = 8, ridge: float = 1e-6,
                  chunk_rows: int = 512) -> PQWeights:
    """Block coordinate descent on codes and codebooks (and bias), starting from `pq` (e.g. k-means).

    Returns new PQWeights; never increases the response error on the calibration statistics
    (up to the `ridge` regularisation of the codebook least squares). Subspaces are visited in
    order, each seeing the updates of the ones before it (Gauss-Seidel). The costly product
    G[block rows] @ W^T is taken for about `chunk_rows` rows (several subspaces) at once and
    kept current with small corrections for the blocks updated since: the same sweep as one
    product per subspace, but with matrix-matrix instead of thin memory-bound products.
    """
    if stats.group != pq.group:
        raise ValueError(f"statistics have group={stats.group}, weights group={pq.group}")
    D = stats.G.shape[1]
    if D != pq.S * pq.Mg * pq.dsub:
        raise ValueError(f"statistics have D={D} input dims, weights S*M_g*dsub={pq.S * pq.Mg * pq.dsub}")
    if iters < 0 or chunk_rows < 1:
        raise ValueError(f"iters must be >= 0 and chunk_rows >= 1, got {iters} and {chunk_rows}")
    codebook = pq.codebook.astype(np.float64)
    codes = pq.codes.copy()
    bias = pq.bias.astype(np.float64)
    w_taps = pq.decode()
    Cog = pq.C_out // pq.group
    width = pq.S * pq.dsub  # columns of one subspace (all taps)
    per_chunk = max(1, chunk_rows // width)
    for g in range(pq.group):
        n = stats.n
        Gc = stats.G[g] - np.outer(stats.xs[g], stats.xs[g]) / n
        C = stats.XtY[g] - np.outer(stats.xs[g], stats.ys[g]) / n
        WT = np.ascontiguousarray(_group_matrix(w_taps, g, pq.group).T)  # W^T [D, Cog]: a block's rows are contiguous
        outs = slice(g * Cog, (g + 1) * Cog)
        for _ in range(iters):
            for j0 in range(0, pq.Mg, per_chunk):
                js = range(j0, min(j0 + per_chunk, pq.Mg))
                ccols = np.concatenate([_subspace_cols(j, pq) for j in js])
                P = Gc[ccols] @ WT  # [rows, Cog] at the chunk's start
                dT = np.zeros_like(P)  # W^T changes of the chunk's columns since then
                for i, j in enumerate(js):
                    m, rows = g * pq.Mg + j, slice(i * width, (i + 1) * width)
                    cols = ccols[rows]
                    Gjj = Gc[np.ix_(cols, cols)]
                    # X_j^T (residual without subspace j): C - G W^T + G_jj W_j^T, with the current W
                    base = C[cols] - P[rows] - Gc[np.ix_(cols, ccols[:i * width])] @ dT[:i * width] + Gjj @ WT[cols]
                    _assign(Gjj, base, codebook[m], codes[:, j, outs], pq)
                    codebook[m] = _refit_codebook(Gjj, base, codebook[m], codes[:, j, outs], pq, ridge)
                    new = codebook[m][codes[:, j, outs]].transpose(0, 2, 1).reshape(width, Cog)
                    dT[rows] = new - WT[cols]
                    WT[cols] = new
        bias[outs] = (stats.ys[g] - WT.T @ stats.xs[g]) / n
    return PQWeights(codebook.astype(np.float32), codes, bias.astype(np.float32), pq.group)


def _subspace_cols(j: int, pq: PQWeights) -> np.ndarray:
    """int [S * dsub]: columns of subspace j in the tap-major group matrix, tap by tap."""
    Cg = pq.Mg * pq.dsub
    return (np.arange(pq.S)[:, None] * Cg + j * pq.dsub + np.arange(pq.dsub)[None, :]).reshape(-1)


def _assign(Gj: np.ndarray, base: np.ndarray, cb: np.ndarray, codes_j: np.ndarray, pq: PQWeights) -> None:
    """Exhaustive search over the K codewords for every (tap, output) of one subspace; updates codes_j.

    Gj: [S*dsub, S*dsub] Gram block of the subspace; base: [S*dsub, C_out/group] its columns' correlation
    with the residual that excludes the whole subspace; cb: [K, dsub]; codes_j: int [S, C_out/group].
    Taps are re-chosen one after another, each seeing the new codes of the taps before it.
    """
    S, dsub = pq.S, pq.dsub
    G4 = Gj.reshape(S, dsub, S, dsub)
    cur = cb[codes_j]  # [S, Cog, dsub]
    quad = np.einsum("kd,de,ke->k", cb, G4[0, :, 0, :], cb) if S == 1 else None
    for s in range(S):
        # correlation of tap s with the residual that excludes only block (s, j)
        c = base.reshape(S, dsub, -1)[s] - np.einsum("due,ute->dt", np.delete(G4[s], s, axis=1),
                                                      np.delete(cur, s, axis=0)) if S > 1 else base
        q = quad if quad is not None else np.einsum("kd,de,ke->k", cb, G4[s, :, s, :], cb)
        codes_j[s] = np.argmin(-2.0 * (cb @ c) + q[:, None], axis=0)  # cost [K, Cog]
        cur[s] = cb[codes_j[s]]


def _refit_codebook(Gj, base, cb, codes_j, pq, ridge) -> np.ndarray:
    """Least-squares codewords of one subspace (all taps) given the codes; ridge pulls toward the old ones.

    Normal equations sum_{s,u} N[s,u,k,l] G[s,u] c_l = sum_{s,t: code=k} base[s, :, t], with N[s,u,k,l]
    the number of outputs whose tap-s code is k and tap-u code is l.
    """
    S, dsub, K = pq.S, pq.dsub, pq.K
    Cog = codes_j.shape[1]
    A = np.zeros((S, Cog, K))
    A[np.arange(S)[:, None], np.arange(Cog)[None, :], codes_j] = 1.0  # one-hot [S, Cog, K]
    rhs = np.einsum("stk,sdt->kd", A, base.reshape(S, dsub, Cog)).reshape(-1)
    N = np.tensordot(A, A, axes=([1], [1])).transpose(0, 2, 1, 3)  # [S, S, K, K]
    H = np.tensordot(N, Gj.reshape(S, dsub, S, dsub), axes=([0, 1], [0, 2]))  # [K, K, dsub, dsub]: k, l, d, e
    H = H.transpose(0, 2, 1, 3).reshape(K * dsub, K * dsub)
    lam = ridge * max(np.trace(H) / H.shape[0], 1e-12)
    sol = np.linalg.solve(H + lam * np.eye(H.shape[0]), rhs + lam * cb.reshape(-1))
    return sol.reshape(K, dsub)
