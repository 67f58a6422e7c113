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


class TailMixin:
    """CloudWorker's tensor-frame calls: the tails of `cloud.partitions`' cuts, answers published to the devices.

    Needs the worker's `counts`, `_publisher(mqtt_cfg)` and `cfg.partitions` / `cfg.models_dir` / `cfg.threads`.
    """

    def _init_tails(self) -> None:
        from edge_workers.runtime import models_dir
        from edge_workers.split_runner import find_manifest

        self.tails = None
        if self.cfg.partitions:
            self.tails = TailRunner(find_manifest(self.cfg.partitions, models_dir(self.cfg.models_dir)),
                                    threads=self.cfg.threads)

    @property
    def tail_cuts(self) -> tuple[str, ...]:
        return self.tails.cuts if self.tails is not None else ()

    def infer_tensors(self, payloads: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Classify tensor frames with the tails: (classes int64 [n], confidence float32 [n]) in input order.

        RuntimeError when no partition is served; ValueError naming the reasons when any frame is rejected
        (the edge checked them: a rejection here means the edge and the cloud serve different manifests)."""
        from cloud_workers import metrics

        if self.tails is None:
            metrics.CLOUD_ERRORS.labels("no_model").inc()
            raise RuntimeError("this cloud worker serves no partition (cloud.partitions is not set)")
        answer = self.tails.answer(payloads)
        if answer.rejected:
            metrics.CLOUD_ERRORS.labels("bad_tensor").inc()
            reasons = sorted(set(answer.rejected.values()))
            raise ValueError(f"{len(answer.rejected)} of {len(payloads)} tensor frames rejected: {', '.join(reasons)}")
        nbytes = sum(len(p) for p in payloads)
        metrics.CLOUD_INFERENCE_SECONDS.labels("cloud-tail").observe(answer.seconds)
        metrics.CLOUD_FRAMES.labels("tensor").inc(len(payloads))
        metrics.CLOUD_BYTES.labels("tensor").inc(nbytes)
        metrics.CLOUD_BATCH.observe(len(payloads))
        self.counts["tensor_frames"] += len(payloads)
        self.counts["bytes"] += nbytes
        return answer.classes, answer.confidence

    def infer_tensors_and_answer(self, payloads: list[bytes], frames: list, mqtt_cfg, answer_by_ns: int):
        """`infer_tensors`, then publish the results to the frames' devices (tier `cloud`) as
        `CloudWorker.infer_and_answer` does: (classes, confidence, published or None)."""
        classes, conf = self.infer_tensors(payloads)
        if len(frames) != len(payloads):
            raise ValueError(f"{len(payloads)} tensor frames to answer, {len(frames)} frame references")
        return classes, conf, self._answer_devices(frames, classes, conf, mqtt_cfg, answer_by_ns)
