"""PQConv / PQGemm as onnxruntime-extensions Python custom ops, dispatching to the native or numba kernels.

Importing this module registers the ops (once per process) in
onnxruntime-extensions' domain ``EXT_DOMAIN``; ``session_options`` returns
SessionOptions with the extensions library loaded. Files keep the ``ai.edgeq``
domain; ``export.runtime_model`` maps it to ``EXT_DOMAIN`` in memory. Used by the
runtime's ``mode="extensions"``; each op finds its prepared kernel layer in a per-process
cache keyed by the node's initializers and attributes. ``export.runtime_model`` adds the
attributes ``codes_layout`` (0 when the file has none) and ``kernels`` (index into ``KERNELS``,
the runtime's choice) to every PQ node in memory.
"""

from __future__ import annotations

import numpy as np
from onnxruntime_extensions import (
    PyCustomOpDef,
    default_opset_domain,
    get_library_path,
    onnx_op,
)

from edge_workers.qcnn import fastscan, kernels
from edge_workers.qcnn.export import CODES_LAYOUTS, COMMON_ATTRS, CONV_ATTRS, GEMM_ATTRS
from edge_workers.qcnn.pq import unpack_fastscan4

EXT_DOMAIN = default_opset_domain()  # "ai.onnx.contrib": the only domain Python ops can live in
_INPUTS = [PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_uint8, PyCustomOpDef.dt_float]
_INT = PyCustomOpDef.dt_int64
KERNELS = fastscan.KERNELS  # the `kernels` attribute is an index into this
_RUNTIME_ATTRS = ("codes_layout", "kernels")


_LAYERS: dict = {}  # (op, attrs, initializer bytes) -> prepared kernels.PQConv / PQGemm
_MAX_LAYERS = 256


def _layer(op_type: str, codebook: np.ndarray, packed: np.ndarray, bias: np.ndarray, a: dict):
    """The prepared layer for these initializers, unpacked and laid out once per process.

    onnxruntime-extensions hands a Python op fresh copies of its inputs on every call and keeps no
    per-node state, so the layer is found by value: hashing ~20 KB of bytes costs microseconds,
    unpacking and transposing the codes costs far more.
    """
    codebook = np.ascontiguousarray(codebook, dtype=np.float32)
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    bias = np.ascontiguousarray(bias, dtype=np.float32)
    key = (op_type, tuple(sorted(a.items())), codebook.shape, codebook.tobytes(), packed.tobytes(), bias.tobytes())
    layer = _LAYERS.get(key)
    if layer is None:
        if len(_LAYERS) >= _MAX_LAYERS:
            _LAYERS.clear()
        layer = _LAYERS[key] = _prepare(op_type, codebook, packed, bias, a)
    return layer


def _prepare(op_type: str, codebook: np.ndarray, packed: np.ndarray, bias: np.ndarray, a: dict):
    """Native or numba layer from a PQ node's initializers (float32 codebook and bias) and int attributes."""
    if op_type == "PQGemm":
        shape = (1, a["M"], a["out_features"])
    else:
        shape = (a["kernel_h"] * a["kernel_w"], a["M"] // a["group"], a["out_channels"])
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if a["codes_layout"] == CODES_LAYOUTS["fastscan4"]:
        codes = unpack_fastscan4(packed, *shape, a.get("group", 1))
        return fastscan.from_attrs(op_type, codebook, codes, bias, a, KERNELS[a["kernels"]], packed)
    codes = kernels.unpack_codes_nb(packed, int(a["num_codes"]), int(a["nbits"])).reshape(shape)
    return fastscan.from_attrs(op_type, codebook, codes, bias, a, KERNELS[a["kernels"]])


@onnx_op(op_type="PQGemm", inputs=_INPUTS, outputs=[PyCustomOpDef.dt_float],
         attrs=dict.fromkeys(COMMON_ATTRS + GEMM_ATTRS + _RUNTIME_ATTRS, _INT))
def pq_gemm_op(x, codebook, codes, bias, **a):
    """x float32 [N, in_features] -> float32 [N, out_features]."""
    return _layer("PQGemm", codebook, codes, bias, a).apply(x)


@onnx_op(op_type="PQConv", inputs=_INPUTS, outputs=[PyCustomOpDef.dt_float],
         attrs=dict.fromkeys(COMMON_ATTRS + CONV_ATTRS + _RUNTIME_ATTRS, _INT))
def pq_conv_op(x, codebook, codes, bias, **a):
    """x float32 [N, in_channels, H, W] -> float32 [N, out_channels, OH, OW]."""
    return _layer("PQConv", codebook, codes, bias, a).apply(x)


def session_options(threads: int = 1):
    """onnxruntime SessionOptions with `threads` intra-op threads and the extensions library registered."""
    from edge_workers.runtime import session_options as base

    so = base(threads)
    so.register_custom_ops_library(get_library_path())
    return so
