"""Tensor frames at the receiver: decode, check against the served cuts, group into float32 batches per cut.

A device running a partition's head (`edgeq publish --head`) publishes one tensor frame (wire
version 2) per sample on edgeq/v1/tensors/<device_id>; an edge running the edge-side head sends
the same frames up to the cloud. Whoever runs the tail takes them through `TensorIngest`::

    ingest = TensorIngest.from_manifest("models/partitions/edge_cnn/edge_cnn.partition.json")
    items, rejected = ingest.decode_many(messages)      # edge_workers.ingest.Received, or bytes
    for cut_id, batch in group(items).items():
        logits = tails.predict(cut_id, batch.x)          # batch.x: float32 [N, *cut shape]

A bad frame raises (or, in `decode_many`, is returned with) a FrameDecodeError whose `reason` is
in TENSOR_REASONS: the wire decoder's and `wire.check_cut`'s reasons (unknown_cut, cut_shape,
cut_codec, bad_scale, ...), `topic_mismatch` as for pixel frames (edge_workers.ingest.decode_frame),
`non_finite` for a tensor decoding to NaN or infinity (float codes, or an int8 scale so large that
code x scale overflows), and `bad_code` for a pq8 code beyond the codebook's K.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelstore.partition_files import cut_specs, load_manifest
from modelstore.partition_pq import load_pq
from publishers import tensor_codec as tc
from publishers import topics, wire
from publishers.errors import FrameDecodeError

logger = logging.getLogger(__name__)

# Every reason a tensor frame is rejected with: a bounded metric label set.
TENSOR_REASONS = (*wire.DECODE_REASONS, "topic_mismatch", "non_finite", "bad_code")


@dataclass(frozen=True, eq=False)
class TensorItem:
    """One accepted tensor frame: the frame, its decoded tensor float32 [*cut shape], its wire bytes, and the
    message it came in (edge_workers.ingest.Received, for the acknowledgement; None for bare bytes)."""

    frame: wire.TensorFrame
    values: np.ndarray
    nbytes: int
    msg: Any = None

    @property
    def cut_id(self) -> str:
        return self.frame.cut_id


@dataclass(eq=False)
class TensorBatch:
    """The accepted frames of one cut, in arrival order: x float32 [N, *cut shape], one row per item."""

    cut_id: str
    x: np.ndarray
    items: list[TensorItem] = field(default_factory=list)

    @property
    def frames(self) -> list[wire.TensorFrame]:
        return [i.frame for i in self.items]

    @property
    def msgs(self) -> list[Any]:
        return [i.msg for i in self.items]

    @property
    def nbytes(self) -> int:
        """Wire bytes of the batch's frames (what crossed the hop)."""
        return sum(i.nbytes for i in self.items)


def group(items: Iterable[TensorItem]) -> dict[str, TensorBatch]:
    """Accepted items per cut id (first-seen order), each stacked into one float32 [N, *shape] batch."""
    per: dict[str, list[TensorItem]] = collections.defaultdict(list)
    for item in items:
        per[item.cut_id].append(item)
    return {cut_id: TensorBatch(cut_id, np.ascontiguousarray(np.stack([i.values for i in its]), dtype=np.float32),
                                its)
            for cut_id, its in per.items()}


def served_entries(manifest: Mapping[str, Any], cuts: str | Sequence[str] = "all") -> list[dict]:
    """The manifest's cut entries named by `cuts` ("all", or points / ids); ValueError naming the unknown ones."""
    entries = list(manifest["cuts"])
    if cuts == "all":
        return entries
    wanted = [cuts] if isinstance(cuts, str) else list(cuts)
    by_key = {c["point"]: c for c in entries} | {c["id"]: c for c in entries}
    missing = [w for w in wanted if w not in by_key]
    if missing:
        raise ValueError(f"partition {manifest['model']} has no cut {missing}; its cuts: "
                         f"{', '.join(c['id'] for c in entries)}")
    return list({by_key[w]["id"]: by_key[w] for w in wanted}.values())


class TensorIngest:
    """Decodes tensor frames and checks them against the cuts served here (cut id -> CutSpec).

    codebooks: cut id -> the pq8 codebook of every served cut that offers pq8. `rejected` counts the
    rejections by reason (TENSOR_REASONS) and `accepted` the frames taken, over the object's life.
    """

    def __init__(self, cuts: tc.CutSpec | Mapping[str, tc.CutSpec],
                 codebooks: Mapping[str, tc.PQCodebook] | None = None,
                 limits: wire.DecodeLimits | None = None) -> None:
        self.cuts = {cuts.cut_id: cuts} if isinstance(cuts, tc.CutSpec) else dict(cuts)
        if not self.cuts:
            raise ValueError("a TensorIngest needs at least one served cut")
        self.codebooks = dict(codebooks or {})
        for cut_id, spec in self.cuts.items():
            pq = self.codebooks.get(cut_id)
            if "pq8" in spec.codecs and (pq is None or pq.dsub != spec.pq_dsub):
                raise ValueError(f"cut {cut_id} offers pq8 (dsub {spec.pq_dsub}) but its codebook is "
                                 f"{'missing' if pq is None else f'dsub {pq.dsub}'}")
        self.limits = limits or wire.DecodeLimits()
        self.rejected: collections.Counter[str] = collections.Counter()
        self.accepted = 0

    @classmethod
    def from_manifest(cls, manifest_path: str | Path, cuts: str | Sequence[str] = "all") -> TensorIngest:
        """The cuts `cuts` of the partition manifest at `manifest_path` (pq8 codebooks from the files beside it,
        checked against the manifest's sha256)."""
        path = Path(manifest_path)
        manifest = load_manifest(path)
        entries = served_entries(manifest, cuts)
        specs = cut_specs(manifest)
        return cls({c["id"]: specs[c["id"]] for c in entries},
                   {c["id"]: load_pq(path.parent, c) for c in entries if "pq" in c})

    def decode(self, payload: bytes | bytearray | memoryview, topic: str | None = None, msg: Any = None) -> TensorItem:
        """One tensor frame -> TensorItem; FrameDecodeError (reason in TENSOR_REASONS) naming what is wrong.

        topic: the MQTT topic it came on, which must be edgeq/v1/tensors/<the frame's device id> (None: no check).
        """
        try:
            item = self._decode(payload, topic, msg)
        except FrameDecodeError as err:
            self.rejected[err.reason] += 1
            raise
        self.accepted += 1
        return item

    def _decode(self, payload, topic: str | None, msg: Any) -> TensorItem:
        frame = wire.decode_tensor(payload, self.limits)
        if topic is not None:
            try:
                topic_device = topics.device_of(topic, "tensors")
            except ValueError as err:
                raise FrameDecodeError("topic_mismatch", str(err)) from err
            if topic_device != frame.device_id:
                raise FrameDecodeError("topic_mismatch", f"topic names device {topic_device!r}, tensor frame "
                                                         f"header says {frame.device_id!r}")
        spec = wire.check_cut(frame, self.cuts)
        try:
            with np.errstate(over="ignore"):  # an int8 scale near FLT_MAX overflows: rejected as non_finite below
                values = frame.values(self.codebooks.get(spec.cut_id) if frame.codec == "pq8" else None)
        except ValueError as err:  # pq8: a code beyond the codebook's K
            raise FrameDecodeError("bad_code", f"{frame.device_id}#{frame.seq} at {spec.cut_id}: {err}") from err
        if not np.isfinite(values).all():
            bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            raise FrameDecodeError("non_finite", f"{frame.device_id}#{frame.seq} at {spec.cut_id}: {bad} of "
                                                 f"{values.size} values decode to NaN or infinity ({frame.codec})")
        return TensorItem(frame, values, memoryview(payload).nbytes, msg)

    def decode_many(self, messages: Iterable[Any]) -> tuple[list[TensorItem], list[tuple[Any, FrameDecodeError]]]:
        """Decode a batch of messages (objects with `.payload` and `.topic`, such as edge_workers.ingest.Received,
        or bare bytes): (accepted items in order, [(message, error)] for the rejected ones)."""
        items, rejected = [], []
        for m in messages:
            bare = isinstance(m, (bytes, bytearray, memoryview))
            payload, topic = (m, None) if bare else (m.payload, m.topic)
            try:
                items.append(self.decode(payload, topic, None if bare else m))
            except FrameDecodeError as err:
                logger.debug("rejected tensor frame%s: %s", f" on {topic}" if topic else "", err)
                rejected.append((m, err))
        return items, rejected
