"""The parts of a partitioned model by cut id (heads or tails of a manifest), and the edge's head for the cloud hop.

`PartRunner` loads one part (head or tail) of each served cut of a partition manifest
(`edgeq partition`) on the part's runtime (`onnx`, or `qcnn` for the parts of a Q-CNN model,
through `edge_workers.runtime.load_runtime`), checks each file's sha256 against the manifest and
warms each up once. `cloud_workers.tail.TailRunner` is the tails' runner; an edge answering the
tensor frames of devices that ran the head itself uses `PartRunner(manifest, "tail")` directly.

`EdgeHead` is the edge-side split: the edge runs the head of a cut on the frames it forwards and
sends the cloud one tensor frame per frame (wire version 2, the same frame a device publishes with
`edgeq publish --head`) instead of the uplink codec's payload::

    head = EdgeHead("models/partitions/cloud_cnn/cloud_cnn.partition.json", "pool2", codec="int8")
    payloads = head.encode(images, frames)   # uint8 [N, 28, 28] + their wire.Frames -> N tensor frames (bytes)
    uplink_bytes = sum(map(len, payloads))   # exact bytes on the edge -> cloud hop
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_workers.runtime import ModelRuntime, load_runtime
from edge_workers.tensor_ingest import served_entries
from modelstore.files import sha256_file
from modelstore.interface import to_input
from modelstore.partition_files import cut_specs, load_manifest
from modelstore.partition_pq import load_pq
from publishers import tensor_codec as tc
from publishers import wire
from publishers.errors import EdgeqError

logger = logging.getLogger(__name__)

PARTS = ("head", "tail")
Loader = Callable[..., ModelRuntime]


class UnknownCutError(EdgeqError, ValueError):
    """A cut id that is not served here (`reason` = "unknown_cut", as wire.check_cut says it)."""

    reason = "unknown_cut"

    def __init__(self, cut_id: str, served: Sequence[str]):
        super().__init__(f"cut {cut_id!r} is not served here; served cuts: {', '.join(served) or 'none'}")
        self.cut_id = cut_id


class PartRunner:
    """One part (`head` or `tail`) of each served cut of a partition manifest, by cut id.

    manifest_path: `<model>.partition.json`, the part files beside it; cuts: "all", or points / ids;
    threads: intra-op threads per runtime; load: `load_runtime(key, path, threads=...)`-like factory.
    `specs` are the served cuts' CutSpecs (for `wire.check_cut` / `TensorIngest`).
    """

    def __init__(self, manifest_path: str | Path, part: str, cuts: str | Sequence[str] = "all", threads: int = 1,
                 load: Loader = load_runtime) -> None:
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.manifest_path = Path(manifest_path)
        self.manifest = load_manifest(self.manifest_path)
        self.part = part
        entries = served_entries(self.manifest, cuts)
        specs = cut_specs(self.manifest)
        self.specs: dict[str, tc.CutSpec] = {c["id"]: specs[c["id"]] for c in entries}
        self.entries = {c["id"]: c for c in entries}
        self._runtimes: dict[str, ModelRuntime] = {}
        for c in entries:
            info = c[part]
            path = self.manifest_path.parent / info["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{part} of cut {c['id']} not found: {path}")
            if sha256_file(path) != info["sha256"]:
                raise ValueError(f"{path}: sha256 differs from {self.manifest_path}'s")
            rt = load(info.get("runtime", self.manifest["runtime"]), str(path), threads=threads)
            rt.warmup()
            self._runtimes[c["id"]] = rt
        logger.info("%s runner: %d %ss of %s (%s)", part, len(entries), part, self.manifest["model"],
                    ", ".join(self.specs))

    @property
    def cuts(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def runtime(self, cut_id: str) -> ModelRuntime:
        """The runtime of `cut_id`'s part; UnknownCutError naming the served cuts otherwise."""
        rt = self._runtimes.get(cut_id)
        if rt is None:
            raise UnknownCutError(cut_id, self.cuts)
        return rt

    def predict(self, cut_id: str, x: np.ndarray) -> np.ndarray:
        """Run `cut_id`'s part on a batch. head: float32 [N, 1, 28, 28] -> float32 [N, *cut shape];
        tail: float32 [N, *cut shape] -> logits float32 [N, classes]. ValueError naming both shapes otherwise."""
        rt = self.runtime(cut_id)
        x = np.ascontiguousarray(x, dtype=np.float32)
        want = tuple(rt.input_shape)
        if x.ndim < 1 or x.shape[1:] != want:
            raise ValueError(f"{self.part} of {cut_id} takes [N, {', '.join(map(str, want))}], got {list(x.shape)}")
        return rt.predict(x)


class EdgeHead:
    """The head of one cut at the edge: frames -> the cut tensor -> tensor frames for the cloud hop.

    codec: a codec offered at the cut (pq8 needs the cut's codebook, `edgeq partition --pq`).
    """

    def __init__(self, manifest_path: str | Path, cut: str, codec: str = "int8", threads: int = 1,
                 load: Loader = load_runtime) -> None:
        self.heads = PartRunner(manifest_path, "head", [cut], threads, load)
        (self.cut_id,) = self.heads.cuts
        self.spec = self.heads.specs[self.cut_id]
        self.codec = tc.check_codec(codec)
        if codec not in self.spec.codecs:
            raise ValueError(f"cut {self.cut_id} offers {', '.join(self.spec.codecs)}, not {codec!r}")
        entry = self.heads.entries[self.cut_id]
        self.pq = load_pq(self.heads.manifest_path.parent, entry) if codec == "pq8" else None

    def run(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 28, 28] frames (after denoising) -> the cut tensor float32 [N, *cut shape]."""
        return self.heads.predict(self.cut_id, to_input(images))

    def frame_bytes(self, device_id: str) -> int:
        """Exact bytes of one tensor frame of this cut and codec from `device_id`."""
        return wire.tensor_frame_size(self.codec, self.spec.shape, self.cut_id, device_id,
                                      self.pq.dsub if self.pq else 0)

    def tensor_frames(self, images: np.ndarray, frames: Sequence[Any]) -> list[wire.TensorFrame]:
        """One TensorFrame per frame: the head's output for images[i], with frames[i]'s device id, seq, capture
        time, label and flags (frames: wire.Frame, or anything with those fields)."""
        if len(images) != len(frames):
            raise ValueError(f"{len(images)} images for {len(frames)} frames")
        z = self.run(images)
        codes, scales = tc.compute_codes(z, self.codec, self.pq)
        dsub = self.pq.dsub if self.pq else 0
        return [wire.TensorFrame(f.device_id, f.seq, f.capture_ns, self.cut_id, self.spec.model_hash, self.codec,
                                 self.spec.shape, codes[i], scales[i], f.label, getattr(f, "flags", 0), dsub)
                for i, f in enumerate(frames)]

    def encode(self, images: np.ndarray, frames: Sequence[Any]) -> list[bytes]:
        """`tensor_frames`, serialized: the payloads of the edge -> cloud hop (sum of lengths = bytes sent)."""
        return [wire.encode_tensor(tf) for tf in self.tensor_frames(images, frames)]


def find_manifest(path: str | Path, base: str | Path = ".") -> Path:
    """A partition manifest given as its path or as a directory holding exactly one `*.partition.json`
    (relative paths under `base`); FileNotFoundError / ValueError naming what was found otherwise."""
    p = Path(base) / path
    if p.is_dir():
        found = sorted(p.glob("*.partition.json"))
        if len(found) != 1:
            raise ValueError(f"{p} holds {len(found)} partition manifests ({', '.join(f.name for f in found)}), "
                             "expected one: name the manifest")
        return found[0]
    if not p.is_file():
        raise FileNotFoundError(f"partition manifest not found: {p}")
    return p
