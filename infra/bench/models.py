"""Models and baselines for benchmarks: the wide-FC test model and onnxruntime's int8 static QDQ quantization."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17


def build_wide_fc(path: str | Path, d_in: int = 4096, d_out: int = 4096,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write a one-layer ONNX model ``logits = input @ W.T + b`` (a Gemm) to `path`.

    Weights are random (seeded), N(0, 1/d_in), bias N(0, 0.01); the input is
    float32 [N, d_in] with a dynamic batch dimension. Returns (W float32
    [d_out, d_in], b float32 [d_out]).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if d_in < 1 or d_out < 1:
        raise ValueError(f"layer sizes must be positive, got d_in={d_in}, d_out={d_out}")
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    b = (0.01 * rng.standard_normal(d_out)).astype(np.float32)
    node = helper.make_node("Gemm", [INPUT_NAME, "fc.weight", "fc.bias"], [OUTPUT_NAME], name="fc", transB=1)
    graph = helper.make_graph(
        [node],
        "wide_fc",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", d_in])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", d_out])],
        initializer=[numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(b, "fc.bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeq-bench")
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w, b


def cpu_has_vnni() -> bool:
    """True if /proc/cpuinfo lists an 8-bit dot-product instruction (AVX512-VNNI or AVX-VNNI)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(text.split())
    return bool(flags & {"avx512_vnni", "avx_vnni", "avx512vnni"})


def calibration_reader(input_name: str, x: np.ndarray, batch: int = 32):
    """An onnxruntime ``CalibrationDataReader`` yielding `x` in batches of `batch`.

    x: float32 [N, *input_shape] calibration inputs (train split only).
    """
    from onnxruntime.quantization import CalibrationDataReader

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"expected a non-empty batch [N, ...] of calibration inputs, got {list(x.shape)}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")

    class ArrayReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.pos = 0

        def get_next(self) -> dict | None:
            if self.pos >= len(x):
                return None
            self.pos += batch
            return {input_name: x[self.pos - batch : self.pos]}

        def rewind(self) -> None:
            self.pos = 0

    return ArrayReader()


def quantize_int8_qdq(in_path: str | Path, out_path: str | Path, calib: np.ndarray,
                      reduce_range: bool | None = None) -> dict:
    """onnxruntime static int8 quantization in QDQ format with per-channel weights; writes `out_path`.

    calib: float32 [N, *input_shape], calibration inputs (never the held-out split).
    The model is first run through ``quant_pre_process`` (shape inference and
    graph optimisation), as onnxruntime recommends. Parameters follow the
    ``quantize_static`` guidance for x86 CPUs: uint8 activations, int8
    weights, and 7-bit weights (``reduce_range``) on CPUs without VNNI,
    detected from /proc/cpuinfo unless `reduce_range` is given.
    Returns the settings used.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    with tempfile.TemporaryDirectory(prefix="edgeq-int8-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        quant_pre_process(str(in_path), str(pre))
        sess = ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"])
        input_name = sess.get_inputs()[0].name
        del sess
        reader = calibration_reader(input_name, calib)
        quantize_static(
            str(pre),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    settings = {
        "format": "QDQ",
        "per_channel": True,
        "activation_type": "QUInt8",
        "weight_type": "QInt8",
        "reduce_range": reduce_range,
        "calibrate_method": "MinMax",
        "calib_images": len(calib),
    }
    logger.info("int8 QDQ model written to %s with %s", out_path, settings)
    return settings


def predict_batched(predict, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Run `predict` (float32 [n, ...] -> [n, classes]) over x in batches; returns float32 [N, classes]."""
    parts = [predict(x[i : i + batch]) for i in range(0, len(x), batch)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def relative_error(y: np.ndarray, y_ref: np.ndarray) -> float:
    """||y - y_ref||_F / ||y_ref||_F over the whole output batch."""
    y = np.asarray(y, dtype=np.float64)
    y_ref = np.asarray(y_ref, dtype=np.float64)
    if y.shape != y_ref.shape:
        raise ValueError(f"output shapes differ: {list(y.shape)} vs reference {list(y_ref.shape)}")
    denom = np.linalg.norm(y_ref)
    if denom == 0:
        raise ValueError("reference output is all zeros; relative error undefined")
    return float(np.linalg.norm(y - y_ref) / denom)
