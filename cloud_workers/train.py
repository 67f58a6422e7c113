"""Training, ONNX export and verification of the reference edge and cloud CNNs on MNIST.

Only the train split is used for fitting; 10 % of it is held out as a
validation split that picks the epoch to keep. The test split is touched only
after training: to check the ONNX export against torch and to report accuracy.
torch and onnx come from the ``train`` extra and are imported lazily.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelstore.evaluate import evaluate_onnx, onnx_logits
from modelstore.files import sha256_file
from modelstore.interface import (
    EVAL_NOISE,
    EVAL_SEED,
    INPUT_NAME,
    INPUT_SPEC,
    NOISY_KEY,
    OUTPUT_NAME,
    OUTPUT_SPEC,
    noisy_copy,
    to_input,
)
from modelstore.manifest import MANIFEST_FORMAT, read_manifest, write_manifest
from publishers.datasets import LabelledImages, load_mnist
from publishers.errors import ConfigError, EdgeqError
from publishers.noise import NoiseConfig, add_noise

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

OPSET = 17
# Op types the downstream quantizer supports; an export with anything else fails.
ALLOWED_OPS = frozenset({"Conv", "Relu", "MaxPool", "Flatten", "Reshape", "Gemm", "MatMul", "Add"})
VAL_FRACTION = 0.1
MAX_SHIFT = 2  # pixels, augmentation
NOISY_FRACTION = 0.5  # of training samples that get sensor noise each epoch
GAUSSIAN_LEVELS = (0.1, 0.3)  # uniform range of the gaussian sigma (fraction of full scale)
SALT_PEPPER_LEVELS = (0.02, 0.1)  # uniform range of the salt-and-pepper pixel fraction
EXPORT_ATOL = 1e-3  # max |onnxruntime - torch| logit difference accepted
MISSING_TRAIN_EXTRA = "edgeq train needs the train extra: pip install 'edgeq[train]'"


@dataclass
class TrainConfig:
    """How to train the reference models.

    limit: use only the first `limit` shuffled train images (smoke tests); None = all.
    threads: torch / onnxruntime intra-op threads; None = library default.
    models: keys of cloud_workers.nets.NETS to train, e.g. ("edge", "cloud").
    """

    data_dir: str = "data/mnist"
    out_dir: str = "models"
    edge_epochs: int = 15
    cloud_epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = EVAL_SEED
    limit: int | None = None
    threads: int | None = None
    models: tuple[str, ...] = ("edge", "cloud")

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        for name in ("edge_epochs", "cloud_epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if self.limit is not None and self.limit < 20:
            raise ConfigError(f"limit must be None or >= 20 images, got {self.limit!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be None or >= 1, got {self.threads!r}")
        known = ("edge", "cloud")
        if not self.models or any(m not in known for m in self.models):
            raise ConfigError(f"models must be a non-empty subset of {known}, got {self.models!r}")

    def epochs_for(self, key: str) -> int:
        return int(self.edge_epochs if key == "edge" else self.cloud_epochs)


# ---------------------------------------------------------------- data


def split_train(data: LabelledImages, limit: int | None, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """Shuffle the train split, keep the first `limit`, hold out VAL_FRACTION for validation."""
    order = np.random.default_rng(seed).permutation(len(data))
    if limit is not None:
        order = order[:limit]
    n_val = max(1, int(round(len(order) * VAL_FRACTION)))
    val, fit = order[:n_val], order[n_val:]
    return _subset(data, fit, "fit"), _subset(data, val, "val")


def _subset(data: LabelledImages, idx: np.ndarray, tag: str) -> LabelledImages:
    return LabelledImages(data.images[idx], data.labels[idx], f"{data.source}[{tag}]")


def random_shift(images: np.ndarray, rng: np.random.Generator, max_shift: int = MAX_SHIFT) -> np.ndarray:
    """Shift each uint8 [N, H, W] image by its own integer (dy, dx) in [-max_shift, max_shift], zero fill."""
    n, h, w = images.shape
    pad = max_shift
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    dy = rng.integers(-max_shift, max_shift + 1, size=n)
    dx = rng.integers(-max_shift, max_shift + 1, size=n)
    rows = (pad - dy)[:, None, None] + np.arange(h)[None, :, None]
    cols = (pad - dx)[:, None, None] + np.arange(w)[None, None, :]
    return padded[np.arange(n)[:, None, None], rows, cols]


def sensor_noise(images: np.ndarray, rng: np.random.Generator, fraction: float = NOISY_FRACTION) -> np.ndarray:
    """Add device sensor noise to about `fraction` of uint8 [N, H, W] images.

    Half of the noisy ones get gaussian noise, half salt-and-pepper, each with a
    level drawn uniformly from GAUSSIAN_LEVELS / SALT_PEPPER_LEVELS.
    """
    out = images.copy()
    for i in np.flatnonzero(rng.random(len(images)) < fraction):
        if rng.random() < 0.5:
            cfg = NoiseConfig("gaussian", float(rng.uniform(*GAUSSIAN_LEVELS)))
        else:
            cfg = NoiseConfig("salt-and-pepper", float(rng.uniform(*SALT_PEPPER_LEVELS)))
        out[i] = add_noise(images[i], cfg, rng)
    return out


# ---------------------------------------------------------------- onnx helpers


def onnx_op_types(path: str | Path) -> set[str]:
    """Set of op types in the main graph of the ONNX model at `path`."""
    try:
        import onnx
    except ImportError as err:
        raise EdgeqError(MISSING_TRAIN_EXTRA) from err
    return {node.op_type for node in onnx.load(str(path)).graph.node}


# ---------------------------------------------------------------- torch


def _import_torch():
    try:
        import onnx  # noqa: F401 - torch.onnx.export needs it
        import torch
    except ImportError as err:
        raise EdgeqError(MISSING_TRAIN_EXTRA) from err
    return torch


def _torch_logits(torch, model, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """float32 logits [N, 10] of `model` in eval mode on uint8 [N, 28, 28] images."""
    model.eval()
    x = torch.from_numpy(to_input(images))
    with torch.no_grad():
        parts = [model(x[i : i + batch]) for i in range(0, len(x), batch)]
    return torch.cat(parts).numpy()


def _accuracy(torch, model, data: LabelledImages) -> float:
    return float(np.mean(_torch_logits(torch, model, data.images).argmax(axis=1) == data.labels))


def _run_epoch(torch, model, opt, sched, x: np.ndarray, y: np.ndarray, batch: int, rng) -> float:
    """One pass over float32 x [N, 1, 28, 28], labels y [N]; returns the mean training loss."""
    model.train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    order = torch.from_numpy(rng.permutation(len(x)))
    total = 0.0
    for i in range(0, len(x), batch):
        idx = order[i : i + batch]
        loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach()) * len(idx)
    return total / len(x)


def _fit(torch, key: str, fit: LabelledImages, val: LabelledImages, cfg: TrainConfig, progress: Progress):
    """Train net `key`; keep the epoch with the best clean validation accuracy (latest on ties)."""
    from cloud_workers.nets import NETS, build_net

    index = list(NETS).index(key)
    torch.manual_seed(cfg.seed + index)
    rng = np.random.default_rng([cfg.seed, index])
    model = build_net(key)
    epochs = cfg.epochs_for(key)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = epochs * math.ceil(len(fit) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.2)
    val_noisy = LabelledImages(add_noise(val.images, EVAL_NOISE, np.random.default_rng(cfg.seed)), val.labels,
                               "val+noise")
    best = {"val_accuracy": -1.0}
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        x = to_input(sensor_noise(random_shift(fit.images, rng), rng))
        loss = _run_epoch(torch, model, opt, sched, x, fit.labels, cfg.batch_size, rng)
        acc, acc_noisy = _accuracy(torch, model, val), _accuracy(torch, model, val_noisy)
        if acc >= best["val_accuracy"]:
            best = {"val_accuracy": acc, "val_accuracy_noisy": acc_noisy, "best_epoch": epoch,
                    "state": copy.deepcopy(model.state_dict())}
        progress(f"{key}: epoch {epoch}/{epochs} loss {loss:.4f} val acc {100 * acc:.2f} % "
                 f"(noisy {100 * acc_noisy:.2f} %) {time.perf_counter() - t0:.1f} s")
    model.load_state_dict(best.pop("state"))
    model.eval()
    best["train_seconds"] = round(time.perf_counter() - start, 2)
    return model, best


def _export(torch, model, path: Path) -> None:
    """Write `model` as ONNX (opset 17, dynamic batch) and check its op types."""
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28, dtype=torch.float32)
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (plain, quantizer-friendly graphs);
        # silence only its "legacy exporter" deprecation notices.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    extra = onnx_op_types(path) - ALLOWED_OPS
    if extra:
        raise RuntimeError(f"{path}: export contains unsupported op types {sorted(extra)}; "
                           f"allowed {sorted(ALLOWED_OPS)}")


def _verify_export(torch, model, path: Path, images: np.ndarray, threads: int | None) -> dict[str, float]:
    """Compare onnxruntime and torch logits on uint8 [N, 28, 28] images; RuntimeError on mismatch."""
    ref = _torch_logits(torch, model, images)
    got = onnx_logits(path, images, threads=threads)
    agreement = float(np.mean(ref.argmax(axis=1) == got.argmax(axis=1)))
    max_diff = float(np.max(np.abs(ref - got)))
    if agreement < 1.0 or not max_diff < EXPORT_ATOL:
        raise RuntimeError(
            f"{path}: onnxruntime disagrees with torch on {len(images)} images: argmax agreement "
            f"{100 * agreement:.3f} % (need 100 %), max |logit diff| {max_diff:.3g} (need < {EXPORT_ATOL:g})"
        )
    return {"argmax_agreement": agreement, "max_abs_logit_diff": max_diff}


# ---------------------------------------------------------------- entry point


def _model_entry(torch, key, model, path, best, fit, val, test, cfg, check) -> dict[str, Any]:
    from cloud_workers.nets import count_parameters

    noisy = noisy_copy(test.images, cfg.seed)
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "architecture": type(model).__name__,
        "parameters": count_parameters(model),
        "opset": OPSET,
        "op_types": sorted(onnx_op_types(path)),
        "input": INPUT_SPEC,
        "output": OUTPUT_SPEC,
        "test_accuracy": {
            "clean": evaluate_onnx(path, test.images, test.labels),
            NOISY_KEY: evaluate_onnx(path, noisy, test.labels),
        },
        "test_images": len(test),
        "val_accuracy": best["val_accuracy"],
        "val_accuracy_noisy": best["val_accuracy_noisy"],
        "train_images": len(fit),
        "val_images": len(val),
        "epochs": cfg.epochs_for(key),
        "best_epoch": best["best_epoch"],
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "torch_version": torch.__version__,
        "train_seconds": best["train_seconds"],
        "export_check": check,
    }


def _previous_entries(out_dir: Path, retrained: tuple[str, ...]) -> dict[str, Any]:
    """Manifest entries of models not retrained now whose files are still unchanged."""
    try:
        old = read_manifest(out_dir)
    except ValueError:
        return {}
    keep = {}
    for key, entry in old.items():
        path = out_dir / str(entry.get("file", ""))
        if key not in retrained and path.is_file() and sha256_file(path) == entry.get("sha256"):
            keep[key] = entry
    return keep


def train_reference_models(cfg: TrainConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train, export, verify and evaluate the models in `cfg.models`; write the manifest.

    Writes `<out_dir>/edge_cnn.onnx`, `<out_dir>/cloud_cnn.onnx` and
    `<out_dir>/manifest.json`; returns the manifest as a dict
    ({"format": 1, "models": {key: entry}}). Raises EdgeqError when the train
    extra is missing, RuntimeError when an export does not match torch.
    """
    progress = progress or (lambda _msg: None)
    torch = _import_torch()
    from cloud_workers.nets import NETS

    fit, val = split_train(load_mnist(cfg.data_dir, "train"), cfg.limit, cfg.seed)
    test = load_mnist(cfg.data_dir, "test")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress(f"training {', '.join(cfg.models)} on {len(fit)} images, validating on {len(val)}")
    models = _previous_entries(out_dir, cfg.models)
    old_threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        for key in cfg.models:
            model, best = _fit(torch, key, fit, val, cfg, progress)
            path = out_dir / NETS[key].onnx_name
            _export(torch, model, path)
            check = _verify_export(torch, model, path, test.images, cfg.threads)
            models[key] = _model_entry(torch, key, model, path, best, fit, val, test, cfg, check)
            acc = models[key]["test_accuracy"]
            progress(f"{key}: wrote {path} ({models[key]['bytes']} bytes), test acc "
                     f"{100 * acc['clean']:.2f} % clean, {100 * acc[NOISY_KEY]:.2f} % {NOISY_KEY}")
    finally:
        torch.set_num_threads(old_threads)
    logger.debug("wrote %s", write_manifest(out_dir, models))
    return {"format": MANIFEST_FORMAT, "models": dict(sorted(models.items()))}
