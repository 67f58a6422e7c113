"""Routing by confidence: 1 - normalised entropy of the softmax, the rule that decides edge or cloud."""

from __future__ import annotations

import numpy as np


def confidence(logits: np.ndarray) -> np.ndarray:
    """1 - normalised entropy of softmax(logits). logits: float32 [N, C] -> float32 [N] in [0, 1].

    1 means one class has all the mass; 0 means a uniform distribution (the
    exit rule of DDNN and KubeEdge Sedna's joint inference).
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"expected logits [N, C>=2], got {list(z.shape)}")
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    entropy = -np.sum(p * np.log(np.clip(p, 1e-30, None)), axis=1)
    return (1.0 - entropy / np.log(z.shape[1])).astype(np.float32)
