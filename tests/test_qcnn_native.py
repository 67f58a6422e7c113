"""Native fast-scan Q-CNN kernels (edge_workers.qcnn.fastscan, _fastscan C extension) against the float-table reference.

Every SIMD path this CPU runs is checked (the scalar one always): outputs are compared with the
numpy float-table reference within the bound table quantization allows, and the paths with each
other (they give the same integer sums, so the same floats). The edge CNN check runs the shipped
model on the whole held-out split. The fallback test imports a copy of the package that has no
compiled extension, as after an install without a C compiler.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_workers.qcnn import fastscan, kernels
from edge_workers.qcnn.compress import CompressConfig, compress_model
from edge_workers.qcnn.export import QcnnFormatError, export_standard, read_pq
from edge_workers.qcnn.pq import fastscan4_bytes, pack_fastscan4, unpack_fastscan4
from edge_workers.runtime import load_runtime
from publishers.datasets import load_mnist
from tests import test_qcnn_kernels

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data" / "mnist"
SHIPPED = REPO / "models" / "edge_cnn.qcnn.onnx"

PATHS = fastscan.paths()


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {f for line in text.splitlines() if line.startswith(("flags", "Features"))
            for f in line.split(":")[1].split()}


def test_extension_is_built_and_dispatch_follows_the_cpu():
    assert fastscan.native() is not None, fastscan.missing_reason()  # built by `pip install -e .` here
    assert PATHS[-1] == "scalar"
    flags = _cpu_flags()
    if "avx2" in flags:
        assert "avx2" in PATHS
    assert ("avx512bw" in PATHS) == ({"avx512f", "avx512bw"} <= flags)
    compiled = fastscan.native().compiled_paths()
    assert set(PATHS) <= set(compiled)
    with pytest.raises(ValueError, match="'nope' is not available"):
        fastscan.FastScanGemm(np.zeros((4, 16, 2), np.float32), np.zeros((1, 4, 8), np.int32),
                              np.zeros(8, np.float32), path="nope").apply(np.zeros((1, 8), np.float32))


@pytest.mark.parametrize("S, Mg, C_out, group",
                         [(1, 5, 70, 1), (9, 4, 32, 1), (6, 3, 12, 3), (25, 1, 4, 4), (2, 7, 33, 1)])
def test_fastscan4_layout_round_trips(S, Mg, C_out, group):
    rng = np.random.default_rng(S * 100 + C_out)
    codes = rng.integers(0, 16, size=(S, Mg, C_out))
    packed = pack_fastscan4(codes, group)
    assert packed.size == fastscan4_bytes(S, Mg, C_out, group)
    assert np.array_equal(unpack_fastscan4(packed, S, Mg, C_out, group), codes)
    with pytest.raises(ValueError, match=r"must be in \[0, 16\)"):
        pack_fastscan4(codes + 16, group)


FC_CASES = [  # M, K, dsub, C_out, N: K < 16, outputs not a multiple of 32, odd M, one sample and many
    (8, 16, 4, 70, 3), (513, 16, 8, 100, 5), (64, 8, 8, 128, 1), (3, 2, 1, 31, 40), (130, 11, 3, 64, 2),
]


def _fc_layer(M, K, dsub, C_out, seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(M, K, dsub)).astype(np.float32), rng.integers(0, K, size=(1, M, C_out)).astype(np.int32),
            rng.normal(size=C_out).astype(np.float32))


@pytest.mark.parametrize("case", FC_CASES)
def test_fc_every_path_matches_float_tables_within_quantization_bound(case):
    M, K, dsub, C_out, N = case
    codebook, codes, bias = _fc_layer(M, K, dsub, C_out, seed=M + C_out)
    x = np.random.default_rng(N).normal(size=(N, M * dsub)).astype(np.float32)
    ref = kernels.pq_gemm_ref(x, codebook, codes, bias)
    lut_ref = np.einsum("nmd,mkd->nmk", x.reshape(N, M, dsub), codebook)
    outs = {}
    for path in PATHS:
        lut, scales = np.empty((N, M, 16), np.float32), np.empty((N, 2), np.float32)
        y = fastscan.FastScanGemm(codebook, codes, bias, path=path).apply(x, lut, scales)
        outs[path] = y
        np.testing.assert_allclose(lut[:, :, :K], lut_ref, rtol=1e-5, atol=1e-5)  # the float tables
        widest = (lut_ref.max(axis=2) - lut_ref.min(axis=2)).max(axis=1)
        np.testing.assert_allclose(scales[:, 0], widest / 255, rtol=1e-5)
        for n in range(N):  # each of M looked-up entries is off by at most scale / 2 (+ float rounding)
            bound = fastscan.error_bound(lut_ref[n], M) * (1 + 1e-3) + 1e-4 * (1 + np.abs(ref[n]).max())
            assert np.abs(y[n] - ref[n]).max() <= bound, (path, n)
        rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert rel < 0.02, (path, rel)  # observed 0.004-0.009
    for path, y in outs.items():  # same integer sums on every path, so the same floats
        assert np.array_equal(y, outs["scalar"]), path


def test_fc_16_bit_accumulators_are_flushed_before_they_overflow():
    # Every code names its row's largest entry, so each output sums M * 255 in table units; M = 1100
    # needs the AVX2 / AVX-512 16-bit accumulators flushed (every 512 / 1024 subspaces) and the NEON
    # ones (every 256), or the sums wrap around.
    M, dsub, C_out = 1100, 2, 40
    rng = np.random.default_rng(5)
    codebook = np.sort(rng.uniform(0.1, 1.0, size=(M, 16, dsub)).astype(np.float32), axis=1)
    codes = np.full((1, M, C_out), 15, np.int32)
    bias = np.zeros(C_out, np.float32)
    x = np.ones((2, M * dsub), np.float32)  # positive inputs: entry 15 is each row's maximum
    ref = kernels.pq_gemm_ref(x, codebook, codes, bias)
    for path in PATHS:
        scales = np.empty((2, 2), np.float32)
        y = fastscan.FastScanGemm(codebook, codes, bias, path=path).apply(x, scales=scales)
        lut = np.einsum("nmd,mkd->nmk", x.reshape(2, M, dsub), codebook)
        rows_top = np.rint((lut[:, :, 15] - lut.min(axis=2)) / scales[:, :1]).sum(axis=1)  # <= M * 255
        assert rows_top.max() > 65535  # a single 16-bit accumulator would have overflowed
        np.testing.assert_allclose(y, ref, rtol=2e-3)  # observed ~1e-4


# The kernel tests' layer cases (C_in, C_out, kernel, strides, pads, dilations, group, dsub, K, H, W), plus:
CONV_CASES = test_qcnn_kernels.CONV_CASES + [
    (16, 70, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, 16, 12, 12),  # 3 blocks of 32 outputs
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_every_path_matches_float_tables_within_quantization_bound(case):
    C_in, C_out, kernel, strides, pads, dil, group, dsub, K, H, W = case
    rng = np.random.default_rng(C_in * C_out + K)
    M, S = C_in // dsub, kernel[0] * kernel[1]
    codebook = rng.normal(size=(M, K, dsub)).astype(np.float32)
    codes = rng.integers(0, K, size=(S, M // group, C_out)).astype(np.int32)
    bias = rng.normal(size=C_out).astype(np.float32)
    x = rng.normal(size=(3, C_in, H, W)).astype(np.float32)
    ref = kernels.pq_conv_ref(x, codebook, codes, bias, kernel, strides, pads, dil, group)
    lut = np.einsum("nmdhw,mkd->nhwmk", x.reshape(3, M, dsub, H, W), codebook)  # one scale per sample
    outs = {}
    for path in PATHS:
        y = fastscan.FastScanConv(codebook, codes, bias, kernel, strides, pads, dil, group, path=path).apply(x)
        assert y.shape == ref.shape
        for n in range(3):
            bound = fastscan.error_bound(lut[n], S * M // group) * (1 + 1e-3) + 1e-4 * (1 + np.abs(ref[n]).max())
            assert np.abs(y[n] - ref[n]).max() <= bound, (path, n)
        outs[path] = y
    for path, y in outs.items():
        assert np.array_equal(y, outs["scalar"]), path


def test_batch_split_over_threads_gives_the_same_outputs():
    codebook, codes, bias = _fc_layer(32, 16, 4, 50, seed=3)
    x = np.random.default_rng(3).normal(size=(37, 128)).astype(np.float32)
    one = fastscan.FastScanGemm(codebook, codes, bias).apply(x)
    assert np.array_equal(fastscan.FastScanGemm(codebook, codes, bias, threads=3).apply(x), one)
    cb = np.random.default_rng(4).normal(size=(4, 16, 4)).astype(np.float32)
    cc = np.random.default_rng(4).integers(0, 16, size=(9, 4, 32))
    xc = np.random.default_rng(4).normal(size=(5, 16, 12, 12)).astype(np.float32)

    def conv(t):
        return fastscan.FastScanConv(cb, cc, np.zeros(32, np.float32), (3, 3), threads=t).apply(xc)

    assert np.array_equal(conv(2), conv(1))


# --------------------------------------------------------------------------------- models and files


@pytest.fixture(scope="module")
def test_split():
    return load_mnist(DATA_DIR, "test")


def test_shipped_edge_cnn_native_agrees_with_float_table_qcnn(test_split):
    from modelstore.interface import to_input

    x = to_input(test_split.images)  # the whole held-out split
    native = load_runtime("qcnn", SHIPPED, kernels="native")
    reference = load_runtime("qcnn", SHIPPED, kernels="numba")
    y_nat, y_ref = native.predict(x), reference.predict(x)
    agreement = float((y_nat.argmax(1) == y_ref.argmax(1)).mean())
    assert agreement >= 0.995  # observed 0.9997 (one of 3000 images differs)
    acc_nat = float((y_nat.argmax(1) == test_split.labels).mean())
    acc_ref = float((y_ref.argmax(1) == test_split.labels).mean())
    assert acc_nat >= acc_ref - 0.003  # observed 99.23 % native, 99.20 % float tables
    assert np.linalg.norm(y_nat - y_ref) / np.linalg.norm(y_ref) < 0.03  # observed 0.006
    ext = load_runtime("qcnn", SHIPPED, kernels="native", mode="extensions").predict(x[:37])
    segments = load_runtime("qcnn", SHIPPED, kernels="native", mode="segments").predict(x[:37])
    assert np.array_equal(ext, segments)  # same kernels, same onnxruntime layers in both modes


def test_kernels_option_is_checked():
    with pytest.raises(ValueError, match="unknown qcnn kernels 'simd'"):
        load_runtime("qcnn", SHIPPED, kernels="simd")


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """The edge CNN compressed with K=16 conv codes as fastscan4 (auto) and as a bit stream, and with K=32."""
    from edge_workers.qcnn.evaluate import load_calibration

    d = tmp_path_factory.mktemp("native")
    calib = load_calibration(str(DATA_DIR), 120, 0)
    cfg = CompressConfig(calib_images=120, ec_iters=1)
    out = {}
    for name, kw in (("auto", {}), ("bitstream", {"codes_layout": "bitstream"}), ("k32", {"conv_k": 32})):
        compress_model(REPO / "models" / "edge_cnn.onnx", d / f"{name}.onnx", calib,
                       CompressConfig(**{**cfg.__dict__, **kw}))
        out[name] = d / f"{name}.onnx"
    return out


def _pq_nodes(path):
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    props = {p.key: p.value for p in model.metadata_props}
    return model, [n for n in model.graph.node if n.domain == "ai.edgeq"], inits, props


def test_compress_stores_4_bit_codes_in_the_kernel_layout(small_models):
    _, nodes, inits, props = _pq_nodes(small_models["auto"])
    layouts = {n.op_type: {a.name: a.i for a in n.attribute}.get("codes_layout", 0) for n in nodes}
    assert layouts == {"PQConv": 1, "PQGemm": 0}  # conv K=16 (4 bits), FC K=8 keeps its denser 3-bit stream
    assert props["edgeq.qcnn.format"] == "2"
    _, old_nodes, old_inits, old_props = _pq_nodes(small_models["bitstream"])
    assert old_props["edgeq.qcnn.format"] == "1"  # no fastscan4 node: readable by format-1 readers
    assert all("codes_layout" not in {a.name for a in n.attribute} for n in old_nodes)
    for new, old in zip(nodes, old_nodes, strict=True):  # same codes, two layouts
        pq_new, _ = read_pq(new, inits)
        pq_old, _ = read_pq(old, old_inits)
        assert np.array_equal(pq_new.codes, pq_old.codes)
    x = np.random.default_rng(0).uniform(size=(9, 1, 28, 28)).astype(np.float32)
    for kern in ("native", "numba"):
        a = load_runtime("qcnn", small_models["auto"], kernels=kern).predict(x)
        b = load_runtime("qcnn", small_models["bitstream"], kernels=kern).predict(x)
        assert np.array_equal(a, b), kern


def test_fastscan4_file_exports_to_standard_ops(small_models, tmp_path):
    std = tmp_path / "std.onnx"
    export_standard(small_models["auto"], std)
    x = np.random.default_rng(1).uniform(size=(4, 1, 28, 28)).astype(np.float32)
    want = load_runtime("onnx", std).predict(x)
    np.testing.assert_allclose(load_runtime("qcnn", small_models["auto"], kernels="numba").predict(x), want,
                               rtol=1e-4, atol=1e-4)


def test_k32_layers_fall_back_to_numba_in_auto_and_fail_in_native(small_models):
    x = np.random.default_rng(2).uniform(size=(3, 1, 28, 28)).astype(np.float32)
    auto = load_runtime("qcnn", small_models["k32"]).predict(x)
    ref = load_runtime("qcnn", small_models["k32"], kernels="numba").predict(x)
    assert np.array_equal(auto.argmax(1), ref.argmax(1))
    with pytest.raises(fastscan.NativeUnavailableError, match="K <= 16, this layer has K=32"):
        load_runtime("qcnn", small_models["k32"], kernels="native")


def test_newer_format_and_unknown_layout_are_rejected(small_models, tmp_path):
    model, nodes, _, _ = _pq_nodes(small_models["auto"])
    onnx.helper.set_model_props(model, {"edgeq.qcnn.format": "3"})
    onnx.save(model, str(tmp_path / "v3.onnx"))
    with pytest.raises(ValueError, match="Q-CNN format '3' is newer"):
        load_runtime("qcnn", tmp_path / "v3.onnx")
    model, nodes, _, _ = _pq_nodes(small_models["auto"])
    for a in nodes[0].attribute:
        if a.name == "codes_layout":
            a.i = 7
    onnx.save(model, str(tmp_path / "layout7.onnx"))
    with pytest.raises(QcnnFormatError, match="unknown codes_layout=7"):
        export_standard(tmp_path / "layout7.onnx", tmp_path / "x.onnx")


# ------------------------------------------------------------------------------------------ fallback


def test_without_the_extension_edgeq_warns_once_and_uses_numba(tmp_path):
    # A copy of the sources with no compiled _fastscan, first on sys.path: what an install without a
    # C compiler leaves. The import of edge_workers.qcnn._fastscan really fails there.
    for pkg in ("edge_workers", "publishers", "cloud_workers", "infra"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    script = f"""
import json, logging, sys
import numpy as np
logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
import edge_workers
from edge_workers.qcnn import fastscan
from edge_workers.runtime import load_runtime
rt = load_runtime("qcnn", {str(SHIPPED)!r})
ref = load_runtime("qcnn", {str(SHIPPED)!r}, kernels="numba")
x = np.random.default_rng(0).uniform(size=(5, 1, 28, 28)).astype(np.float32)
try:
    load_runtime("qcnn", {str(SHIPPED)!r}, kernels="native")
    native_error = None
except fastscan.NativeUnavailableError as err:
    native_error = str(err)
print(json.dumps({{"package": edge_workers.__file__, "paths": fastscan.paths(),
                   "same": bool(np.array_equal(rt.predict(x), ref.predict(x))), "native_error": native_error}}))
"""
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["package"].startswith(str(tmp_path))  # the copy without the extension was imported
    assert result["paths"] == [] and result["same"]
    assert "_fastscan is not built" in result["native_error"]
    warnings = [line for line in proc.stderr.splitlines() if "native kernels unavailable" in line]
    assert len(warnings) == 1, proc.stderr  # one line, once per process
    assert warnings[0].startswith("WARNING edge_workers.qcnn.fastscan:")
    assert "edge_workers.qcnn._fastscan" in warnings[0]
    assert "C compiler" in warnings[0]


@pytest.mark.parametrize("case", CONV_CASES + [
    (128, 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 1, 16, 5, 4),  # 1,152 rows per output: flushes on the way
])
def test_net_pq_conv_channels_last_gives_the_conv_kernels_outputs(case):
    """The net runs PQ convs on channels-last activations, scanning kernel rows in place (or gathering them for
    groups, dilations and odd row lengths): same tables, offsets and integer sums as the standalone conv kernel,
    so the same floats, on every path. A ReLU and a 2 x 2 pooling after it check the layouts around it."""
    from edge_workers.qcnn import native_net

    C_in, C_out, kernel, strides, pads, dil, group, dsub, K, H, W = case
    rng = np.random.default_rng(C_in + 3 * C_out + K)
    M, S = C_in // dsub, kernel[0] * kernel[1]
    layer = fastscan.FastScanConv(rng.normal(size=(M, K, dsub)).astype(np.float32),
                                  rng.integers(0, K, size=(S, M // group, C_out)).astype(np.int32),
                                  rng.normal(size=C_out).astype(np.float32), kernel, strides, pads, dil, group)
    x = rng.normal(size=(3, C_in, H, W)).astype(np.float32)
    pq = native_net._pq(None, layer, (C_in, H, W))
    OH, OW = layer.out_size(H, W)
    alone = native_net.NativeNet([pq], (C_out, OH, OW))
    for path in PATHS:
        layer.path = alone.path = path
        want = layer.apply(x)
        assert np.array_equal(alone.run(x), want), path
    if OH >= 2 and OW >= 2:
        pool = (native_net.MAXPOOL, native_net._sizes(C=C_out, H=OH, W=OW, kh=2, kw=2, sh=2, sw=2, OH=OH // 2,
                                                      OW=OW // 2), ())
        net = native_net.NativeNet([(*pq, True), pool], (C_out, OH // 2, OW // 2))
        r = np.maximum(want, 0)[:, :, :OH // 2 * 2, :OW // 2 * 2].reshape(3, C_out, OH // 2, 2, OW // 2, 2)
        assert np.array_equal(net.run(x), r.max(axis=(3, 5)))
