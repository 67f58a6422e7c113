"""Model runtimes behind one small interface, registered by key (``onnx``, ``qcnn``, ...).

A runtime is constructed from a model path and options, warmed up once, then
called with whole batches::

    rt = load_runtime("onnx", "models/edge_cnn.onnx", threads=1)
    rt.warmup()
    logits = rt.predict(x)          # x: float32 [N, 1, 28, 28] -> float32 [N, 10]

New runtimes register themselves with :func:`register`; the Q-CNN runtime
(key ``qcnn``) lives with the Q-CNN code and is imported lazily so the float
path never pays for numba or onnxruntime-extensions.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)


class ModelRuntime(Protocol):
    """What the edge and cloud workers need from a model."""

    key: str
    path: str
    input_shape: tuple  # per-sample shape, e.g. (1, 28, 28)

    def warmup(self) -> None: ...

    def predict(self, x: np.ndarray) -> np.ndarray:
        """x: float32 [N, *input_shape] -> logits float32 [N, classes]."""
        ...


REPO_MODELS = Path(__file__).resolve().parents[1] / "models"


def models_dir(configured: str) -> Path:
    """The models directory: as configured, else the repository's models/."""
    return Path(configured) if configured else REPO_MODELS


_REGISTRY: dict[str, Callable[..., ModelRuntime]] = {}
# Runtimes defined in modules with heavy imports: key -> module that registers it.
_LAZY: dict[str, str] = {"qcnn": "edge_workers.qcnn.runtime"}


def register(key: str):
    """Class decorator: make a runtime constructible by ``load_runtime(key, ...)``."""

    def deco(cls):
        cls.key = key
        _REGISTRY[key] = cls
        return cls

    return deco


def available() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def load_runtime(key: str, path: str | os.PathLike, **options) -> ModelRuntime:
    """Construct the runtime registered under ``key`` for the model at ``path``."""
    if key not in _REGISTRY and key in _LAZY:
        importlib.import_module(_LAZY[key])
    try:
        factory = _REGISTRY[key]
    except KeyError:
        raise ValueError(f"unknown model runtime {key!r}; available: {', '.join(available())}") from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    return factory(str(path), **options)


def static_input_shape(path: str, name: str, shape) -> tuple[int, ...]:
    """Per-sample input dims of a model, which must be static: shape [N, *dims] -> dims."""
    dims = list(shape[1:])
    if not all(isinstance(d, int) for d in dims):
        raise ValueError(f"{path}: input {name} needs static per-sample dims, got {shape}")
    return tuple(dims)


def check_batch(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """x as contiguous float32 [N, *input_shape]; ValueError naming both shapes otherwise."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[1:] != tuple(input_shape):
        raise ValueError(f"expected input [N, {', '.join(map(str, input_shape))}], got {list(x.shape)}")
    return x


def session_options(threads: int = 1):
    """onnxruntime SessionOptions with a fixed thread count (0 = onnxruntime's default: all cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


@register("onnx")
class OnnxRuntime:
    """Any standard ONNX model (float or int8 QDQ) through onnxruntime's CPU provider."""

    key = "onnx"

    def __init__(self, path: str, threads: int = 1, session_options_=None):
        import onnxruntime as ort

        self.path = path
        so = session_options_ or session_options(threads)
        try:
            self.session = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise ValueError(f"onnxruntime cannot load {path}: {err}") from err
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        self.input_shape = static_input_shape(path, inp.name, inp.shape)

    def warmup(self) -> None:
        self.predict(np.zeros((1, *self.input_shape), dtype=np.float32))

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = check_batch(x, self.input_shape)
        return self.session.run([self.output_name], {self.input_name: x})[0]
