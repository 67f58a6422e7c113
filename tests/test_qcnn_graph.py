"""Reading float models (unsupported ops, BatchNorm folding, MatMul+Add) and the `edgeq compress` command."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_workers.qcnn.compress import CompressConfig, compress_model
from edge_workers.qcnn.export import export_standard
from edge_workers.qcnn.graph import UnsupportedModelError, activations, load_float_model
from edge_workers.runtime import load_runtime
from infra.cli import main
from tests.conftest import REPO


def _model(nodes, inits, out_shape, in_shape=("N", 8, 9, 9)):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                          initializer=[numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k)
                                       for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _grouped_net(rng):
    """Conv(8->12, 3x3, group 2, stride 2, pads 1) - BN - Relu - Conv(12->8, 2x2, dilation 2) - Relu - Flatten
    - MatMul - Add."""
    inits = {
        "w1": rng.normal(size=(12, 4, 3, 3)) * 0.3, "b1": rng.normal(size=12) * 0.1,
        "s": rng.uniform(0.5, 1.5, 12), "beta": rng.normal(size=12) * 0.1, "mu": rng.normal(size=12) * 0.1,
        "var": rng.uniform(0.5, 2, 12),
        "w2": rng.normal(size=(8, 12, 2, 2)) * 0.3, "b2": rng.normal(size=8) * 0.1,
        "wf": rng.normal(size=(8 * 3 * 3, 40)) * 0.2, "bf": rng.normal(size=40) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], group=2),
        helper.make_node("BatchNormalization", ["c1", "s", "beta", "mu", "var"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[2, 2], dilations=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "wf"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "bf"], ["y"], name="fc_bias"),
    ]
    return _model(nodes, inits, ["N", 40])


def test_unsupported_ops_are_named_in_the_error(tmp_path):
    rng = np.random.default_rng(0)
    w = {"w": rng.normal(size=(4, 8 * 9 * 9)), "b": np.zeros(4)}
    sig = _model([helper.make_node("Flatten", ["x"], ["f"], name="flat"),
                  helper.make_node("Gemm", ["f", "w", "b"], ["g"], name="fc", transB=1),
                  helper.make_node("Sigmoid", ["g"], ["y"], name="gate_sigmoid")], w, ["N", 4])
    onnx.save(sig, str(tmp_path / "sig.onnx"))
    with pytest.raises(UnsupportedModelError, match=r"node 'gate_sigmoid' \(Sigmoid\).*supported ops: Conv, Gemm"):
        load_float_model(tmp_path / "sig.onnx")
    lstm_inits = {"W": rng.normal(size=(1, 16, 9)), "R": rng.normal(size=(1, 16, 4))}
    lstm = _model([helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="encoder_lstm", hidden_size=4)],
                  lstm_inits, ["T", 1, "N", 4], in_shape=("T", "N", 9))
    onnx.save(lstm, str(tmp_path / "lstm.onnx"))
    with pytest.raises(UnsupportedModelError, match=r"node 'encoder_lstm' \(LSTM\)"):
        load_float_model(tmp_path / "lstm.onnx")
    bn_first = _model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="lonely_bn")],
                      {k: np.ones(8) for k in "sbmv"}, ["N", 8, 9, 9])
    onnx.save(bn_first, str(tmp_path / "bn.onnx"))
    with pytest.raises(UnsupportedModelError, match=r"node 'lonely_bn'.*only directly after a Conv"):
        load_float_model(tmp_path / "bn.onnx")


def test_batchnorm_folding_and_matmul_add_keep_the_function(tmp_path):
    rng = np.random.default_rng(1)
    onnx.save(_grouped_net(rng), str(tmp_path / "net.onnx"))
    model, layers = load_float_model(tmp_path / "net.onnx")
    assert [(ly.name, ly.kind) for ly in layers] == [("conv1", "conv"), ("conv2", "conv"), ("fc", "fc")]
    assert layers[0].group == 2 and layers[0].strides == (2, 2) and layers[1].dilations == (2, 2)
    assert {n.op_type for n in model.graph.node} == {"Conv", "Relu", "Flatten", "Gemm"}
    x = rng.normal(size=(7, 8, 9, 9)).astype(np.float32)
    want = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = activations(model, x, ["y"])["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_grouped_strided_dilated_model_runs_in_both_runtimes(tmp_path):
    rng = np.random.default_rng(2)
    onnx.save(_grouped_net(rng), str(tmp_path / "net.onnx"))
    calib = rng.normal(size=(300, 8, 9, 9)).astype(np.float32)
    cfg = CompressConfig(conv_dsub=2, conv_k=4, fc_dsub=4, fc_k=4, last_fc="pq", codebook_dtype="float32", ec_iters=3)
    rep = compress_model(tmp_path / "net.onnx", tmp_path / "q.onnx", calib, cfg)
    assert [ly["kind_stored"] for ly in rep.layers] == ["pq", "pq", "pq"]
    assert [ly["M"] for ly in rep.layers] == [4, 6, 18]
    for ly in rep.layers:
        assert ly["response_error_ec"] < ly["response_error_kmeans"], ly
    export_standard(tmp_path / "q.onnx", tmp_path / "std.onnx")
    x = rng.normal(size=(5, 8, 9, 9)).astype(np.float32)
    want = load_runtime("onnx", tmp_path / "std.onnx").predict(x)
    for mode in ("direct", "extensions"):  # direct: graph starts and ends with a PQ node, no ORT segment there
        got = load_runtime("qcnn", tmp_path / "q.onnx", mode=mode, kernels="numba").predict(x)  # float tables
        assert got.shape == (5, 40)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=mode)


def test_cli_compress_writes_both_files_and_reports_layers(tmp_path, capsys):
    out, std = tmp_path / "q.onnx", tmp_path / "q.std.onnx"
    rc = main(["compress", str(REPO / "models" / "edge_cnn.onnx"), str(out), "--calib-images", "120",
               "--ec-iters", "1", "--export-standard", str(std)])
    captured = capsys.readouterr()
    assert rc == 0 and out.is_file() and std.is_file()
    assert "PQ M=64 K=8 dsub=8" in captured.out and "x smaller than 322909 B" in captured.out
    assert "before EC" in captured.err and "after EC" in captured.err  # per-layer progress on stderr


def test_cli_compress_rejects_unsupported_model(tmp_path, capsys):
    m = _model([helper.make_node("Sigmoid", ["x"], ["y"], name="sig0")], {}, ["N", 8, 9, 9])
    onnx.save(m, str(tmp_path / "sig.onnx"))
    rc = main(["compress", str(tmp_path / "sig.onnx"), str(tmp_path / "out.onnx")])
    assert rc == 2
    assert "node 'sig0' (Sigmoid)" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()
