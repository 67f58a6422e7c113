"""The cloud's half of a split model: a partition manifest's tails by cut id, and tensor frames answered with them.

    tails = TailRunner("models/partitions/edge_cnn/edge_cnn.partition.json")   # every cut, warmed up once
    logits = tails.predict("edge_cnn@pool2", x)          # x: float32 [N, 32, 4, 4] -> float32 [N, 10]
    answer = tails.answer(payloads)                      # tensor frames (bytes) of any served cuts

Tails run on their part's runtime (`onnx`, or `qcnn` for a Q-CNN model's parts). `answer` decodes
and checks every frame (`edge_workers.tensor_ingest.TensorIngest`), batches the accepted ones per
cut and gives a class and a confidence per frame in input order, class -1 for a rejected frame
with its reason: one bad frame never fails the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_workers.routing import confidence
from edge_workers.runtime import load_runtime
from edge_workers.split_runner import Loader, PartRunner
from edge_workers.tensor_ingest import TensorIngest, group
from publishers import wire

logger = logging.getLogger(__name__)


@dataclass
class TailAnswer:
    """Per input frame, in order: classes int64 [n] (-1: rejected), confidence float32 [n] (0: rejected),
    the decoded frame (None: rejected); `rejected` = index -> reason; `seconds` = tail inference time."""

    classes: np.ndarray
    confidence: np.ndarray
    frames: list[wire.TensorFrame | None]
    rejected: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.frames) - len(self.rejected)


class TailRunner(PartRunner):
    """The tails of a partition manifest's served cuts (`cuts`: "all", or points / ids), warmed up once.

    `ingest` checks frames against exactly these cuts (pq8 codebooks loaded for the cuts that have one).
    """

    def __init__(self, manifest_path: str | Path, cuts: str | Sequence[str] = "all", threads: int = 1,
                 load: Loader = load_runtime) -> None:
        super().__init__(manifest_path, "tail", cuts, threads, load)
        self.ingest = TensorIngest.from_manifest(self.manifest_path, list(self.cuts))

    def predict(self, cut_id: str, x: np.ndarray) -> np.ndarray:
        """x: float32 [N, *cut shape] -> logits float32 [N, 10]; UnknownCutError for a cut not served here,
        ValueError naming the shapes for a batch of another shape."""
        logits = super().predict(cut_id, x)
        if logits.ndim != 2 or len(logits) != len(x):
            raise ValueError(f"tail of {cut_id} gave {list(logits.shape)} for a batch of {len(x)}, expected [N, C]")
        return logits

    def classify(self, cut_id: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x: float32 [N, *cut shape] -> (classes int64 [N], confidence float32 [N], 1 - normalised entropy)."""
        logits = self.predict(cut_id, x)
        return logits.argmax(axis=1).astype(np.int64), confidence(logits)

    def answer(self, payloads: Sequence[bytes]) -> TailAnswer:
        """Classify tensor frames (any mix of served cuts; one call per cut present). Rejected frames get class -1
        and their reason (edge_workers.tensor_ingest.TENSOR_REASONS) in `rejected`; the others are answered."""
        n = len(payloads)
        out = TailAnswer(np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.float32), [None] * n)
        items, bad = self.ingest.decode_many(
            [_Indexed(i, p) for i, p in enumerate(payloads)])
        for msg, err in bad:
            out.rejected[msg.index] = err.reason
        t0 = time.perf_counter()
        for cut_id, batch in group(items).items():
            classes, conf = self.classify(cut_id, batch.x)
            idx = np.fromiter((m.index for m in batch.msgs), dtype=np.int64, count=len(batch.items))
            out.classes[idx], out.confidence[idx] = classes, conf
            for i, item in zip(idx, batch.items, strict=True):
                out.frames[i] = item.frame
        out.seconds = time.perf_counter() - t0
        return out


@dataclass(frozen=True)
class _Indexed:
    """A payload with its position in the call (a message for TensorIngest.decode_many, without a topic)."""

    index: int
    payload: bytes
    topic: None = None
