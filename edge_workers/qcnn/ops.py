"""PQConv / PQGemm as onnxruntime-extensions Python custom ops, dispatching to the numba kernels.

Importing this module registers the ops (once per process) in
onnxruntime-extensions' domain ``EXT_DOMAIN``; ``session_options`` returns
SessionOptions with the extensions library loaded. Files keep the ``ai.edgeq``
domain; ``export.runtime_model`` maps it to ``EXT_DOMAIN`` in memory.
"""

from __future__ import annotations

import numpy as np
from onnxruntime_extensions import (
    PyCustomOpDef,
    default_opset_domain,
    get_library_path,
    onnx_op,
)

from edge_workers.qcnn import kernels
from edge_workers.qcnn.export import COMMON_ATTRS, CONV_ATTRS, GEMM_ATTRS

EXT_DOMAIN = default_opset_domain()  # "ai.onnx.contrib": the only domain Python ops can live in
_INPUTS = [PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_uint8, PyCustomOpDef.dt_float]
_INT = PyCustomOpDef.dt_int64


def _codes(packed: np.ndarray, num_codes: int, nbits: int, shape: tuple) -> np.ndarray:
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    return kernels.unpack_codes_nb(packed, int(num_codes), int(nbits)).reshape(shape)


@onnx_op(op_type="PQGemm", inputs=_INPUTS, outputs=[PyCustomOpDef.dt_float],
         attrs={k: _INT for k in COMMON_ATTRS + GEMM_ATTRS})
def pq_gemm_op(x, codebook, codes, bias, **a):
    """x float32 [N, in_features] -> float32 [N, out_features]."""
    M = a["M"]
    codes = _codes(codes, a["num_codes"], a["nbits"], (1, M, a["out_features"]))
    return kernels.pq_gemm(x, codebook, codes, bias)


@onnx_op(op_type="PQConv", inputs=_INPUTS, outputs=[PyCustomOpDef.dt_float],
         attrs={k: _INT for k in COMMON_ATTRS + CONV_ATTRS})
def pq_conv_op(x, codebook, codes, bias, **a):
    """x float32 [N, in_channels, H, W] -> float32 [N, out_channels, OH, OW]."""
    S = a["kernel_h"] * a["kernel_w"]
    codes = _codes(codes, a["num_codes"], a["nbits"], (S, a["M"] // a["group"], a["out_channels"]))
    return kernels.pq_conv(x, codebook, codes, bias, (a["kernel_h"], a["kernel_w"]),
                           (a["stride_h"], a["stride_w"]),
                           (a["pad_top"], a["pad_left"], a["pad_bottom"], a["pad_right"]),
                           (a["dilation_h"], a["dilation_w"]), a["group"])


def session_options(threads: int = 1):
    """onnxruntime SessionOptions with `threads` intra-op threads and the extensions library registered."""
    from edge_workers.runtime import session_options as base

    so = base(threads)
    so.register_custom_ops_library(get_library_path())
    return so
