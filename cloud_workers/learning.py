"""Cloud side of learning: store reduced labelled frames per codec, fit an MLP on them, hot-swap the serving model.

Edge workers (edge_workers.learning) call `add_training(split, codec, codes,
n, labels, keys)` with what they would send up for inference: `split` is
``train`` (to learn from) or ``eval`` (held out, only scored). `fit(codec,
code_size, n)` starts a background thread that trains a scikit-learn MLP on `n`
training samples (a seeded shuffle of all stored ones, so smaller sets are
prefixes of larger ones), exports it to ONNX, loads it with onnxruntime and
swaps it in under a lock: `infer` keeps answering with the previous model until
the swap, so no frame waits for a fit. `fit_status(job)` reports the result.

`LearningMixin` holds all of it; `cloud_workers.worker.CloudWorker` inherits it.
"""

from __future__ import annotations

import collections
import copy
import logging
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud_workers.pca_model import PcaMlp, export_mlp_onnx
from edge_workers.codecs import FRAME_CODECS, UplinkCodec, check_codec
from edge_workers.reduce import PCAModel

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval")
MAX_SAMPLES = 200_000   # per (split, codec, code_size): 157 MB of raw frames at most
EXPORT_ATOL = 1e-3      # max |onnxruntime - numpy| logit difference accepted after export


@dataclass
class LearnConfig:
    """How the cloud fits its model (sklearn MLPClassifier, adam, relu; bounded and seeded).

    Inputs are divided by max(std, input_floor * max std) per feature, so a
    pixel that never lit up in training cannot blow up at serving time.
    Early stopping on a random `val_fraction` of the training samples (never
    the eval split): the best epoch is kept, training stops after `patience`
    epochs without improvement or after `max_epochs`.
    """

    hidden: tuple[int, ...] = (256,)
    alpha: float = 1e-4
    lr: float = 1e-3
    batch_size: int = 128  # at most; smaller for small training sets (about 20 steps per epoch)
    max_epochs: int = 30
    patience: int = 5
    val_fraction: float = 0.1
    input_floor: float = 0.1
    seed: int = 1234

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden must be positive layer sizes, got {self.hidden!r}")
        if self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError(f"max_epochs, patience, batch_size must be >= 1, got {self.max_epochs}, "
                             f"{self.patience}, {self.batch_size}")
        if not 0 < self.val_fraction < 1 or not 0 <= self.input_floor <= 1:
            raise ValueError(f"val_fraction in (0, 1) and input_floor in [0, 1] required, got "
                             f"{self.val_fraction}, {self.input_floor}")


def train_mlp(x: np.ndarray, y: np.ndarray, cfg: LearnConfig) -> PcaMlp:
    """Fit an MLP on features float32 [N, d] with labels int [N]; returns a PcaMlp (exportable with export_mlp_onnx)."""
    from sklearn.neural_network import MLPClassifier

    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"expected features [N, d] and labels [N], got {list(x.shape)} and {list(y.shape)}")
    n_val = round(len(x) * cfg.val_fraction)
    if len(x) - n_val < 10 or n_val < 1:
        raise ValueError(f"need at least {int(np.ceil(11 / (1 - cfg.val_fraction)))} training samples, got {len(x)}")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(x))
    xv, yv, x, y = x[order[:n_val]], y[order[:n_val]], x[order[n_val:]], y[order[n_val:]]
    std = x.std(axis=0)
    scale = np.ascontiguousarray(np.maximum(std, max(cfg.input_floor * float(std.max()), 1e-6)), dtype=np.float32)
    xs, xvs = x / scale, xv / scale
    # Small sets get smaller batches, so an epoch still makes about 20 adam steps.
    batch = min(cfg.batch_size, max(8, len(xs) // 20))
    mlp = MLPClassifier(hidden_layer_sizes=cfg.hidden, activation="relu", solver="adam", alpha=cfg.alpha,
                        learning_rate_init=cfg.lr, batch_size=batch, random_state=cfg.seed)
    classes = np.arange(10)
    best: dict[str, Any] = {"val_accuracy": -1.0, "best_epoch": 0}
    start, epoch = time.perf_counter(), 0
    for epoch in range(1, cfg.max_epochs + 1):
        perm = rng.permutation(len(xs))
        mlp.partial_fit(xs[perm], y[perm], classes=classes)  # one adam pass over the shuffled set
        acc = float(np.mean(mlp.predict(xvs) == yv))
        if acc > best["val_accuracy"]:
            best = {"val_accuracy": acc, "best_epoch": epoch, "mlp": copy.deepcopy(mlp)}
        if epoch - best["best_epoch"] >= cfg.patience:
            break
    history = {"val_accuracy": best["val_accuracy"], "best_epoch": best["best_epoch"], "epochs_run": epoch,
               "train_samples": len(xs), "val_samples": len(xvs), "fit_seconds": time.perf_counter() - start}
    return PcaMlp(best["mlp"], scale, history)


def learn_codec(name: str, code_size: int, pca: PCAModel, frame_shape: tuple[int, int]) -> UplinkCodec:
    """The codec that decodes `code_size`-byte payloads of codec `name` (k follows from the size for pca-*).

    ValueError for an unknown codec, a size no codec of that name has, or a k beyond the PCA model's k_max.
    """
    check_codec(name)
    if name in FRAME_CODECS:
        if code_size != frame_shape[0] * frame_shape[1]:
            raise ValueError(f"{name}: frames are {frame_shape[0]}x{frame_shape[1]} = "
                             f"{frame_shape[0] * frame_shape[1]} B, got {code_size} B per frame")
        return UplinkCodec(name, frame_shape=frame_shape)
    if name == "pca-f16" and code_size % 2:
        raise ValueError(f"pca-f16 payloads are 2 bytes per coefficient, got {code_size} B per frame")
    return UplinkCodec(name, pca=pca, k=code_size // 2 if name == "pca-f16" else code_size)


@dataclass
class LearnedModel:
    """A fitted model serving one (codec, code_size): decode -> flatten -> onnxruntime MLP."""

    codec: UplinkCodec
    runtime: Any  # edge_workers.runtime.OnnxRuntime
    version: int
    train_samples: int

    def logits(self, codes: np.ndarray) -> np.ndarray:
        """codes uint8 [N, code_size] -> logits float32 [N, 10]."""
        x = self.codec.decode_codes(codes)
        return self.runtime.predict(np.ascontiguousarray(x.reshape(len(x), -1)))


class SampleStore:
    """Reduced labelled samples per (split, codec, code_size), deduplicated by (device, seq)."""

    def __init__(self, max_samples: int = MAX_SAMPLES):
        self.max_samples = max_samples
        self._codes: dict[tuple, list[np.ndarray]] = collections.defaultdict(list)
        self._labels: dict[tuple, list[np.ndarray]] = collections.defaultdict(list)
        self._keys: dict[tuple, list[tuple[int, str]]] = collections.defaultdict(list)
        self._seen: dict[tuple, set] = collections.defaultdict(set)

    def add(self, slot: tuple, codes: np.ndarray, labels: np.ndarray, keys: list) -> int:
        """Add rows not seen before; returns how many were duplicates. RuntimeError when the slot is full."""
        seen = self._seen[slot]
        fresh = [i for i, (device, seq) in enumerate(keys) if (device, int(seq)) not in seen]
        if len(seen) + len(fresh) > self.max_samples:
            raise RuntimeError(f"learning store {slot} is full ({self.max_samples} samples)")
        for i in fresh:
            seen.add((keys[i][0], int(keys[i][1])))
            self._keys[slot].append((int(keys[i][1]), keys[i][0]))
        self._codes[slot].append(codes[fresh])
        self._labels[slot].append(labels[fresh])
        return len(keys) - len(fresh)

    def count(self, slot: tuple) -> int:
        return len(self._seen.get(slot, ()))

    def counts(self) -> dict[str, int]:
        return {".".join(str(s) for s in slot): len(seen) for slot, seen in self._seen.items()}

    def take(self, slot: tuple, n: int = 0, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`n` samples (all when 0): (codes uint8 [n, size], labels int64 [n]).

        Samples are sorted by (seq, device), then shuffled by a permutation seeded
        with `seed` (None: kept in order), and the first n taken: for one seed and
        one set of stored frames, smaller sets are prefixes of larger ones, and
        every codec gets the same frames (a dataset sorted by class stays balanced).
        """
        have = self.count(slot)
        if have == 0:
            raise ValueError(f"no {slot[0]} samples for codec {slot[1]} at {slot[2]} B/frame")
        if n > have:
            raise ValueError(f"asked for {n} {slot[0]} samples of {slot[1]} ({slot[2]} B/frame), have {have}")
        order = np.asarray(sorted(range(have), key=self._keys[slot].__getitem__), dtype=np.int64)
        if seed is not None:
            order = order[np.random.default_rng(seed).permutation(have)]
        order = order[: n or have]
        codes = np.concatenate(self._codes[slot])[order]
        labels = np.concatenate(self._labels[slot]).astype(np.int64)[order]
        return codes, labels


class LearningMixin:
    """Learning methods of the cloud worker actor. Call `_init_learning` from the actor's __init__."""

    def _init_learning(self, pca: PCAModel, frame_shape: tuple[int, int], threads: int = 1) -> None:
        self._learn_lock = threading.Lock()
        self._store = SampleStore()
        self._pca, self._frame_shape, self._learn_threads = pca, tuple(frame_shape), threads
        self._learned: dict[tuple[str, int], LearnedModel] = {}
        self._jobs: dict[int, dict] = {}
        self._fit_thread: threading.Thread | None = None
        self.learn_counts: collections.Counter[str] = collections.Counter()

    def add_training(self, split: str, codec: str, codes: bytes, n: int, labels: bytes, keys: list) -> int:
        """Store n reduced labelled samples. codes: n * code_size bytes; labels: n uint8; keys: n (device, seq).

        Returns the samples now stored for (split, codec, code_size). ValueError on bad arguments.
        """
        try:
            if split not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
            if n < 1 or len(codes) % n or len(labels) != n or len(keys) != n:
                raise ValueError(f"{codec}: {len(codes)} code bytes, {len(labels)} labels and {len(keys)} keys "
                                 f"do not make {n} samples")
            learn_codec(codec, len(codes) // n, self._pca, self._frame_shape)  # validates codec and size
        except ValueError:
            with self._learn_lock:
                self.learn_counts["rejected_batches"] += 1  # the edge counts the frames (learn.*.cloud_error)
            raise
        size = len(codes) // n
        slot = (split, codec, size)
        with self._learn_lock:
            self.learn_counts["bytes_received"] += len(codes)
            self.learn_counts["label_bytes_received"] += len(labels)
            self.learn_counts[f"{split}.frames_received"] += n
            dup = self._store.add(slot, np.frombuffer(codes, np.uint8).reshape(n, size),
                                  np.frombuffer(labels, np.uint8), list(keys))
            self.learn_counts["duplicates"] += dup
            return self._store.count(slot)

    def fit(self, codec: str, code_size: int, n: int = 0, config: dict | None = None, swap: bool = True) -> int:
        """Start fitting on the first `n` training samples (0 = all) in a background thread; returns a job id.

        RuntimeError while another fit runs; ValueError for bad arguments or too few samples.
        """
        cfg = LearnConfig(**(config or {}))
        c = learn_codec(codec, int(code_size), self._pca, self._frame_shape)
        with self._learn_lock:
            if self._fit_thread is not None and self._fit_thread.is_alive():
                raise RuntimeError("a fit is already running on this cloud worker")
            codes, labels = self._store.take(("train", codec, c.code_size), int(n), seed=cfg.seed)
            job = len(self._jobs) + 1
            self._jobs[job] = {"state": "running", "codec": codec, "code_size": c.code_size, "n": len(codes)}
            self._fit_thread = threading.Thread(target=self._run_fit, args=(job, c, codes, labels, cfg, swap),
                                                name=f"fit-{job}", daemon=True)
            self._fit_thread.start()
        return job

    def fit_status(self, job: int) -> dict:
        """The job's state: {"state": "running"} or its result ({"state": "done", ...} / {"state": "failed", ...})."""
        with self._learn_lock:
            if job not in self._jobs:
                raise ValueError(f"no fit job {job}; jobs: {sorted(self._jobs)}")
            return dict(self._jobs[job])

    def evaluate(self, codec: str, code_size: int) -> dict:
        """Accuracy of the model serving (codec, code_size) on the stored eval samples."""
        with self._learn_lock:
            model = self._learned.get((codec, int(code_size)))
            codes, labels = self._store.take(("eval", codec, int(code_size)))
        if model is None:
            raise RuntimeError(f"no learned model for {codec} at {code_size} B/frame yet: call fit first")
        pred = model.logits(codes).argmax(axis=1)
        return {"accuracy": float(np.mean(pred == labels)), "frames": len(labels), "version": model.version}

    def learned_model(self, codec: str, code_size: int) -> LearnedModel | None:
        """The model learned for (codec, code_size), or None (read by `infer` on every call)."""
        return self._learned.get((codec, code_size))  # one dict read: the swap is a single assignment

    def learning_stats(self) -> dict:
        with self._learn_lock:
            out = dict(self.learn_counts)
            out.update({f"stored.{k}": v for k, v in self._store.counts().items()})
            out.update({f"learned.{c}.{s}": m.version for (c, s), m in self._learned.items()})
            return out

    def _run_fit(self, job: int, c: UplinkCodec, codes: np.ndarray, labels: np.ndarray, cfg: LearnConfig,
                 swap: bool) -> None:
        from edge_workers.runtime import load_runtime

        try:
            _warm_up()
            t0, cpu0 = time.perf_counter(), time.thread_time()
            x = c.decode_codes(codes)
            model = train_mlp(x.reshape(len(x), -1), labels, cfg)
            with tempfile.TemporaryDirectory(prefix="edgeq-learned-") as tmp:
                path = export_mlp_onnx(model, Path(tmp) / "learned.onnx")
                runtime = load_runtime("onnx", path, threads=self._learn_threads)
            runtime.warmup()
            probe = np.ascontiguousarray(x[:256].reshape(min(len(x), 256), -1))
            diff = float(np.max(np.abs(runtime.predict(probe) - model.logits(probe))))
            if not diff < EXPORT_ATOL:
                raise RuntimeError(f"exported model disagrees with sklearn: max |logit diff| {diff:.3g}")
            train_s, train_cpu_s = time.perf_counter() - t0, time.thread_time() - cpu0
            learned = LearnedModel(c, runtime, job, len(codes))
            with self._learn_lock:
                if swap:
                    self._learned[(c.name, c.code_size)] = learned  # the hot swap: one reference
                self.learn_counts["fits"] += 1
            result = {"state": "done", "train_seconds": train_s, "train_cpu_seconds": train_cpu_s,
                      "version": job, "swapped": swap,
                      **dict(model.history.items()), "config": asdict(cfg)}
            result.update(self._score(learned))
        except Exception as err:  # reported through fit_status, never kills the actor
            logger.exception("fit %d failed", job)
            result = {"state": "failed", "error": f"{type(err).__name__}: {err}"}
        with self._learn_lock:
            self._jobs[job].update(result)

    def _score(self, model: LearnedModel) -> dict:
        slot = ("eval", model.codec.name, model.codec.code_size)
        with self._learn_lock:
            if not self._store.count(slot):
                return {}
            codes, labels = self._store.take(slot)
        pred = model.logits(codes).argmax(axis=1)
        return {"heldout_accuracy": float(np.mean(pred == labels)), "heldout_frames": len(labels)}


_warm = threading.Lock()
_warmed = False


def _warm_up() -> None:
    """Import onnx and sklearn and run one tiny fit once per process, so the first fit's time is training time
    (sklearn's first partial_fit also probes the BLAS libraries)."""
    global _warmed
    with _warm:
        if not _warmed:
            import onnx  # noqa: F401

            rng = np.random.default_rng(0)
            train_mlp(rng.normal(size=(40, 4)).astype(np.float32), np.arange(40) % 10,
                      LearnConfig(hidden=(4,), max_epochs=1, patience=1, batch_size=8))
            _warmed = True


def wait_fit(handle, job: int, timeout_s: float = 1800.0, poll_s: float = 0.2) -> dict:
    """Driver side: poll a cloud actor's fit_status until the job ends (bounded); RuntimeError if it failed."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        status = ray.get(handle.fit_status.remote(job), timeout=60)
        if status["state"] == "done":
            return status
        if status["state"] == "failed":
            raise RuntimeError(f"fit {job} failed: {status['error']}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"fit {job} still running after {timeout_s:.0f}s")
        time.sleep(poll_s)
