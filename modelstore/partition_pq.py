"""pq8 codebooks for cut tensors: k-means per sub-vector of dsub channels on train-split activations.

The tensor at a cut, float32 [N, C, *rest], is split along the channel axis into M = C / dsub
sub-vectors at every position; each subspace gets K <= 256 codewords (Lloyd's k-means, seeded,
numpy only, on at most `max_vectors` sampled sub-vectors), so a frame carries M * prod(rest) uint8
codes (``publishers.tensor_codec.PQCodebook``). Codebooks are trained on images of the train
split only and stored next to the pair as ``<cut id>.pq.npz`` (array ``centroids``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from modelstore.files import sha256_file
from modelstore.interface import to_input
from modelstore.partition_files import codec_bytes
from publishers import tensor_codec as tc

logger = logging.getLogger(__name__)


def kmeans(x: np.ndarray, ksub: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means: x float32 [n, d] -> centroids float32 [min(ksub, n), d]; empty clusters re-seeded."""
    k = min(ksub, len(x))
    c = x[rng.choice(len(x), k, replace=False)].copy()
    for _ in range(iters):
        d = (c * c).sum(1)[None, :] - 2.0 * (x @ c.T)
        assign = d.argmin(1)
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(c)
        np.add.at(sums, assign, x)
        empty = counts == 0
        c[~empty] = sums[~empty] / counts[~empty, None]
        if empty.any():
            c[empty] = x[rng.choice(len(x), int(empty.sum()), replace=False)]
    return c.astype(np.float32)


def train_pq(z: np.ndarray, dsub: int, ksub: int = 256, iters: int = 12, max_vectors: int = 20_000,
             seed: int = 0) -> tc.PQCodebook:
    """A PQCodebook [C/dsub, K, dsub] for activations z float32 [N, C, *rest] (C divisible by dsub)."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    n, c = z.shape[:2]
    if c % dsub:
        raise ValueError(f"dsub {dsub} must divide the channel count {c} of activations {list(z.shape)}")
    m = c // dsub
    sub = z.reshape(n, m, dsub, -1).transpose(1, 0, 3, 2).reshape(m, -1, dsub)  # [M, n * positions, dsub]
    rng = np.random.default_rng(seed)
    take = rng.choice(sub.shape[1], min(max_vectors, sub.shape[1]), replace=False)
    cents = [kmeans(sub[j, take], ksub, iters, rng) for j in range(m)]
    k = min(len(x) for x in cents)
    return tc.PQCodebook(np.stack([x[:k] for x in cents]))


def load_pq(out_dir: str | Path, cut: dict) -> tc.PQCodebook:
    """The pq8 codebook of a manifest cut entry (ValueError naming the file when it is missing or altered)."""
    path = Path(out_dir) / cut["pq"]["file"]
    if sha256_file(path) != cut["pq"]["sha256"]:
        raise ValueError(f"{path}: sha256 differs from the partition manifest's")
    with np.load(path) as f:
        return tc.PQCodebook(f["centroids"])


def add_pq(manifest: dict, out_dir: str | Path, load: Callable[[str, str], Any], train_images: np.ndarray,
           dsub: int = 4, ksub: int = 256, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Train a pq8 codebook for every cut whose channel count dsub divides, on uint8 [N, 28, 28] train images;
    writes ``<cut id>.pq.npz`` and adds cut["pq"] and the pq8 byte counts. Returns `manifest`."""
    out_dir = Path(out_dir)
    x = to_input(train_images)
    for i, cut in enumerate(manifest["cuts"], 1):
        shape = tuple(cut["shape"])
        if shape[0] % dsub:
            logger.info("%s: no pq8, dsub %d does not divide %d channels", cut["id"], dsub, shape[0])
            continue
        head = load(manifest["runtime"], str(out_dir / cut["head"]["file"]))
        z = np.concatenate([head.predict(x[j:j + 500]) for j in range(0, len(x), 500)])
        pq = train_pq(z, dsub, ksub)
        path = out_dir / f"{cut['id']}.pq.npz"
        with open(path, "wb") as f:
            np.savez(f, centroids=pq.centroids)
        cut["pq"] = {"file": path.name, "sha256": sha256_file(path), "dsub": dsub, "K": pq.ksub, "M": pq.M,
                     "train_images": len(train_images)}
        cut["codecs"].update(codec_bytes(cut["id"], shape, ["pq8"], dsub))
        progress(f"pq8: {cut['id']} [{i}/{len(manifest['cuts'])}] M={pq.M} K={pq.ksub} dsub={dsub}, "
                 f"{cut['codecs']['pq8']['payload_bytes']} B per frame")
    if "pq8" not in manifest["codecs"]:
        manifest["codecs"].append("pq8")
    return manifest
