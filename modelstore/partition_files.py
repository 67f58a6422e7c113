"""Partitioned models on disk: head/tail ONNX pairs and the JSON partition manifest that lists every cut.

``write_partition`` cuts a model (``modelstore.partition``) and writes, in `out_dir`::

    <cut id>.head.onnx, <cut id>.tail.onnx     one pair per cut ("edge_cnn@pool1.head.onnx")
    <model>.partition.json                      the manifest (PARTITION_FORMAT, described in docs/partition.md)

The manifest gives, per cut: id, tensor name, per-sample shape, the runtime of each part, the
files' sha256, and bytes per frame per codec (codes plus scales, and the whole tensor frame with
device id "dev0", as the 828-byte raw frame is counted). `cut_specs` turns it into the
`publishers.tensor_codec.CutSpec`s a receiver checks frames against.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modelstore.files import sha256_file, write_text_atomic
from modelstore.partition import PartitionError, find_cuts, model_name, runtime_key, split
from publishers import tensor_codec as tc
from publishers import wire

logger = logging.getLogger(__name__)

PARTITION_FORMAT = 1
REFERENCE_DEVICE = "dev0"  # the device id the frame sizes are given for (the raw frame is 828 bytes with it)
DEFAULT_CODECS = ("float32", "float16", "int8", "int8-channel")


def manifest_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.partition.json"


def raw_frame_bytes(shape: tuple[int, ...] = (28, 28), device_id: str = REFERENCE_DEVICE) -> tuple[int, int]:
    """(payload, whole frame) bytes of a uint8 pixel frame: (784, 828) for MNIST from "dev0"."""
    payload = 1
    for d in shape:
        payload *= d
    return payload, wire.HEADER_SIZE + 4 * len(shape) + len(device_id) + payload


def codec_bytes(cut_id: str, shape: tuple[int, ...], codecs: Sequence[str], pq_dsub: int = 0) -> dict[str, dict]:
    """codec -> {"payload_bytes", "frame_bytes"} for the codecs applicable at a cut of per-sample `shape`."""
    out = {}
    for codec in codecs:
        dsub = pq_dsub if codec == "pq8" else 0
        if not tc.applicable(codec, shape, dsub or None):
            continue
        out[codec] = {"payload_bytes": tc.payload_bytes(codec, shape, dsub),
                      "frame_bytes": wire.tensor_frame_size(codec, shape, cut_id, REFERENCE_DEVICE, dsub)}
    return out


def write_partition(model_path: str | Path, out_dir: str | Path, cuts: str | Sequence[str] = "all",
                    codecs: Sequence[str] = DEFAULT_CODECS,
                    progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Cut the model at `model_path` at `cuts` ("all", or cut points / ids such as "pool1" or "edge_cnn@pool1"),
    write each head/tail pair and the manifest to `out_dir`; returns the manifest (a dict)."""
    import onnx

    for c in codecs:
        tc.check_codec(c)
    model_path, out_dir = Path(model_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(model_path))
    name = model_name(model_path)
    found = find_cuts(model, name)
    chosen = found if cuts == "all" else _select(found, [cuts] if isinstance(cuts, str) else list(cuts), name)
    sha = sha256_file(model_path)
    source_runtime = runtime_key(model)
    entries = []
    for i, cut in enumerate(chosen, 1):
        head, tail = split(model, cut)
        files = {}
        for part, proto in (("head", head), ("tail", tail)):
            path = out_dir / f"{cut.cut_id}.{part}.onnx"
            tmp = path.with_name(f".{path.name}.tmp")
            onnx.save(proto, str(tmp))
            tmp.replace(path)
            files[part] = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                           "pq_nodes": sum(n.op_type in ("PQConv", "PQGemm") for n in proto.graph.node),
                           "runtime": source_runtime}
        entries.append({"id": cut.cut_id, "point": cut.point, "tensor": cut.tensor, "shape": list(cut.shape),
                        "elements": cut.elements, "head": files["head"], "tail": files["tail"],
                        "codecs": codec_bytes(cut.cut_id, cut.shape, codecs)})
        progress(f"partition: {cut.cut_id} [{i}/{len(chosen)}] tensor {list(cut.shape)} written")
    inp = next(v for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer})
    in_shape = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
    raw_payload, raw_frame = raw_frame_bytes(tuple(in_shape[-2:]))
    manifest = {
        "format": PARTITION_FORMAT, "model": name, "source": model_path.name, "sha256": sha,
        "model_hash": sha[: 2 * wire.MODEL_HASH_LEN], "runtime": source_runtime,
        "input": {"name": inp.name, "shape": in_shape, "raw_payload_bytes": raw_payload, "raw_frame_bytes": raw_frame},
        "reference_device_id": REFERENCE_DEVICE, "codecs": list(codecs), "cuts": entries,
    }
    save_manifest(out_dir, manifest)
    logger.info("partitioned %s at %d cuts into %s", model_path, len(entries), out_dir)
    return manifest


def _select(found, wanted: list[str], name: str):
    by_key = {c.point: c for c in found} | {c.cut_id: c for c in found}
    missing = [w for w in wanted if w not in by_key]
    if missing:
        raise PartitionError(f"{name}: no legal cut {missing}; legal cuts: {', '.join(c.point for c in found)}")
    return list(dict.fromkeys(by_key[w] for w in wanted))


def save_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    return write_text_atomic(manifest_path(out_dir, manifest["model"]), json.dumps(manifest, indent=2) + "\n")


def load_manifest(path: str | Path) -> dict[str, Any]:
    """A partition manifest; ValueError naming the file when it is not one this code reads."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not a partition manifest: {err}") from err
    if manifest.get("format") != PARTITION_FORMAT:
        raise ValueError(f"{path}: partition format {manifest.get('format')!r}, this edgeq reads {PARTITION_FORMAT}")
    return manifest


def cut_specs(manifest: dict[str, Any]) -> dict[str, tc.CutSpec]:
    """cut id -> CutSpec (model hash, shape, offered codecs) of every cut in a partition manifest."""
    model_hash = bytes.fromhex(manifest["model_hash"])
    return {c["id"]: tc.CutSpec(c["id"], model_hash, tuple(c["shape"]), tuple(c["codecs"]),
                                int(c.get("pq", {}).get("dsub", 0)))
            for c in manifest["cuts"]}
