"""The device's half of a split model: runs a partition's head with onnxruntime and encodes its tensor frames.

`edgeq publish --head` (docs/partition.md, "Device/edge split"): each pixel frame a device
produces goes through the head of one cut of a partitioned model (`edgeq partition`), and the
tensor at the cut leaves as a tensor frame (wire version 2, `publishers.wire.encode_tensor`) on
`edgeq/v1/tensors/<device_id>`, instead of the pixel frame on `edgeq/v1/frames/<device_id>`::

    head = load_head("models/partitions/edge_cnn/edge_cnn@pool2.head.onnx", codec="int8")
    data = head.encode(frame)        # wire.Frame with uint8 [28, 28] pixels -> tensor frame bytes

The partition manifest (`<model>.partition.json`, next to the head file) gives the cut id, its
tensor shape, the model hash every frame carries, the codecs offered there and the files'
sha256, which are checked before anything runs. This package is the only one a device installs,
so the manifest is read here with json (not through `modelstore`), and onnxruntime is imported
only when a head is loaded: `edgeq publish` without `--head` needs numpy and paho only. A head
holding Q-CNN layers (PQConv/PQGemm, runtime `qcnn`) needs the edge tier's native runtime and is
refused with the cuts a device can run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from publishers import tensor_codec as tc
from publishers import wire
from publishers.errors import ConfigError

logger = logging.getLogger(__name__)

HEAD_SUFFIX = ".head.onnx"
MANIFEST_SUFFIX = ".partition.json"
PARTITION_FORMAT = 1  # = modelstore.partition_files.PARTITION_FORMAT (a layer above: not importable here)
INPUT_SCALE = np.float32(255.0)  # model input = uint8 pixels / 255 (modelstore.interface.to_input)


@dataclass(frozen=True)
class HeadSpec:
    """One cut's head as the manifest describes it.

    cut: the CutSpec frames are encoded for (id, model hash, per-sample shape, offered codecs);
    head_path: the head ONNX file, float32 [N, *input_shape] -> float32 [N, *cut.shape];
    input_shape: per-sample model input, (1, 28, 28); pq_path: the cut's pq8 codebook file, if any.
    """

    manifest_path: Path
    cut: tc.CutSpec
    head_path: Path
    input_shape: tuple[int, ...]
    pq_nodes: int
    pq_path: Path | None = None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read partition manifest {path}: {err.strerror}") from err
    except ValueError as err:
        raise ConfigError(f"{path} is not a partition manifest: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != PARTITION_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ConfigError(f"{path}: partition format {got!r}, this edgeq reads {PARTITION_FORMAT}")
    return manifest


def resolve_head(head: str | Path, cut: str | None = None) -> HeadSpec:
    """The HeadSpec of `head`: a head file `<dir>/<cut id>.head.onnx` (its manifest `<model>.partition.json`
    beside it), or a manifest plus `cut` (a point such as "pool2" or an id such as "edge_cnn@pool2").

    Raises ConfigError naming the file, the cut and the legal choices when they do not fit together,
    or when a file's sha256 is not the manifest's.
    """
    path = Path(head)
    if path.name.endswith(MANIFEST_SUFFIX):
        manifest_path = path
        if not cut:
            raise ConfigError(f"--head {path} is a partition manifest: name the cut with --cut (a point or an id)")
    elif path.name.endswith(HEAD_SUFFIX):
        cut_id = path.name[: -len(HEAD_SUFFIX)]
        model, sep, _point = cut_id.rpartition("@")
        if not sep:
            raise ConfigError(f"--head {path}: a head file is named <model>@<point>{HEAD_SUFFIX}")
        if cut and cut not in (cut_id, _point):
            raise ConfigError(f"--head {path} is the head of cut {cut_id}, --cut says {cut!r}")
        manifest_path, cut = path.with_name(f"{model}{MANIFEST_SUFFIX}"), cut_id
    else:
        raise ConfigError(f"--head must be a <cut id>{HEAD_SUFFIX} file or a <model>{MANIFEST_SUFFIX} manifest, "
                          f"got {path}")
    manifest = _read_manifest(manifest_path)
    entries = manifest.get("cuts", [])
    entry = next((c for c in entries if cut in (c["id"], c["point"])), None)
    if entry is None:
        known = ", ".join(c["id"] for c in entries) or "none"
        raise ConfigError(f"{manifest_path} has no cut {cut!r}; its cuts: {known}")
    head_path = manifest_path.parent / entry["head"]["file"]
    if not head_path.is_file():
        raise ConfigError(f"head file {head_path} of cut {entry['id']} is missing")
    if _sha256(head_path) != entry["head"]["sha256"]:
        raise ConfigError(f"{head_path}: sha256 differs from {manifest_path}'s (a head of another partition?)")
    pq_path = None
    if "pq" in entry:
        pq_path = manifest_path.parent / entry["pq"]["file"]
    spec = tc.CutSpec(entry["id"], bytes.fromhex(manifest["model_hash"]), tuple(entry["shape"]),
                      tuple(entry["codecs"]), int(entry.get("pq", {}).get("dsub", 0)))
    return HeadSpec(manifest_path, spec, head_path, tuple(manifest["input"]["shape"]),
                    int(entry["head"].get("pq_nodes", 0)), pq_path)


def _codebook(spec: HeadSpec) -> tc.PQCodebook:
    if spec.pq_path is None:
        raise ConfigError(f"cut {spec.cut.cut_id} has no pq8 codebook (partition it with --pq)")
    manifest = _read_manifest(spec.manifest_path)
    entry = next(c for c in manifest["cuts"] if c["id"] == spec.cut.cut_id)
    if not spec.pq_path.is_file() or _sha256(spec.pq_path) != entry["pq"]["sha256"]:
        raise ConfigError(f"{spec.pq_path}: missing, or its sha256 differs from {spec.manifest_path}'s")
    with np.load(spec.pq_path) as f:
        return tc.PQCodebook(f["centroids"])


class HeadRunner:
    """A cut's head on onnxruntime (CPU, `threads` intra-op threads) and the tensor frames of its output.

    Thread-safe: the devices of one `edgeq publish` share it (onnxruntime sessions run concurrently).
    `frames`, `seconds` and `bytes` count what `encode` did (head time: onnxruntime's run only).
    """

    def __init__(self, spec: HeadSpec, codec: str = "int8", threads: int = 1) -> None:
        codec = tc.check_codec(codec)
        if codec not in spec.cut.codecs:
            raise ConfigError(f"cut {spec.cut.cut_id} offers the codecs {', '.join(spec.cut.codecs)}, not {codec!r}")
        if spec.pq_nodes:
            raise ConfigError(
                f"head {spec.head_path.name} holds {spec.pq_nodes} Q-CNN layer(s) (PQConv/PQGemm), which need the "
                "qcnn runtime of the edge tier; a device runs heads on onnxruntime: take a cut before the first "
                "PQ layer (edge_cnn.qcnn@relu1, @pool1) or the float model's partition")
        self.spec, self.codec = spec, codec
        self.pq = _codebook(spec) if codec == "pq8" else None
        self.frame_shape = tuple(spec.input_shape[-2:])
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ConfigError("--head runs the head with onnxruntime: pip install onnxruntime "
                              "(or edgeq[server])") from err
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(spec.head_path), sess_options=so,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise ConfigError(f"onnxruntime cannot load {spec.head_path}: {err}") from err
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._lock = threading.Lock()
        self.frames = self.bytes = 0
        self.seconds = 0.0
        self.run(np.zeros((1, *spec.input_shape), dtype=np.float32))  # warm-up, and a shape check of the file

    @property
    def cut_id(self) -> str:
        return self.spec.cut.cut_id

    @property
    def frame_bytes(self) -> int:
        """Bytes of one tensor frame from a device id of 4 characters ("dev0"), as the manifest counts them."""
        return wire.tensor_frame_size(self.codec, self.spec.cut.shape, self.cut_id, "dev0",
                                      self.pq.dsub if self.pq else 0)

    def run(self, x: np.ndarray) -> np.ndarray:
        """x: float32 [N, *input_shape] (pixels / 255) -> the cut tensor float32 [N, *cut.shape]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.spec.input_shape:
            raise ValueError(f"head {self.cut_id} takes [N, {', '.join(map(str, self.spec.input_shape))}], "
                             f"got {list(x.shape)}")
        z = self.session.run([self.output_name], {self.input_name: x})[0]
        if z.shape[1:] != self.spec.cut.shape:
            raise ValueError(f"head {self.spec.head_path} gave {list(z.shape)}, cut {self.cut_id} carries "
                             f"[N, {', '.join(map(str, self.spec.cut.shape))}]")
        return z

    def tensor_frame(self, frame: wire.Frame) -> wire.TensorFrame:
        """The TensorFrame of a pixel frame (uint8 [H, W] = the model's input size): same device, seq,
        capture time, label and flags; the head's output encoded with this runner's codec."""
        px = np.asarray(frame.pixels)
        if px.dtype != np.uint8 or px.shape != self.frame_shape:
            raise ValueError(f"head {self.cut_id} takes uint8 {list(self.frame_shape)} frames, got "
                             f"{px.dtype} {list(px.shape)}")
        x = px.reshape(1, *self.spec.input_shape).astype(np.float32) / INPUT_SCALE
        t0 = time.perf_counter()
        z = self.run(x)
        spent = time.perf_counter() - t0
        (tf,) = wire.tensor_frames(z, self.codec, self.spec.cut, frame.device_id, frame.seq, frame.capture_ns,
                                   [frame.label], frame.flags, self.pq)
        with self._lock:
            self.seconds += spent
        return tf

    def encode(self, frame: wire.Frame) -> bytes:
        """The tensor frame of a pixel frame, serialized (`publishers.device.Device`'s encoder)."""
        data = wire.encode_tensor(self.tensor_frame(frame))
        with self._lock:
            self.frames += 1
            self.bytes += len(data)
        return data

    def describe(self) -> str:
        """One line for progress and summaries: cut, codec, bytes per frame, head time per frame."""
        per = self.bytes / self.frames if self.frames else float(self.frame_bytes)
        ms = 1000 * self.seconds / self.frames if self.frames else 0.0
        return (f"head {self.cut_id} ({self.codec}, shape {'x'.join(map(str, self.spec.cut.shape))}): "
                f"{per:.1f} B/tensor frame, {ms:.3f} ms/frame on the device")


def load_head(head: str | Path, cut: str | None = None, codec: str = "int8", threads: int = 1) -> HeadRunner:
    """resolve_head + HeadRunner: the runner for `edgeq publish --head HEAD [--cut CUT] --codec CODEC`."""
    runner = HeadRunner(resolve_head(head, cut), codec, threads)
    logger.info("device head %s from %s, codec %s, %d B per frame (dev0)", runner.cut_id,
                runner.spec.manifest_path, codec, runner.frame_bytes)
    return runner
