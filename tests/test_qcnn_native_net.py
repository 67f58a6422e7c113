"""The native net (edge_workers.qcnn.native_net, net.h): whole Q-CNN graphs in one C call.

Float layers are checked against onnxruntime running the same ONNX graph; the shipped edge CNN against
the runtime's onnxruntime-segments mode (same PQ kernels, so the outputs differ only by float summation
order). Graphs with a node the net does not run must fall back to segments with the same outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_workers.qcnn import fastscan, native_net
from edge_workers.runtime import load_runtime
from publishers.datasets import load_mnist

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "edge_cnn.qcnn.onnx"


def _graph(nodes, inits, in_shape, out_name="y"):
    """An opset-17 model with input x float32 [N, *in_shape] and output `out_name`."""
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
                          [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ort(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _net(model, in_shape, threads=1):
    layers, out_shape = native_net.plan(model, {}, in_shape)
    return native_net.NativeNet(layers, out_shape, threads)


rng = np.random.default_rng(7)
CONVS = [  # (C, H, W, C_out, kernel, strides, pads t l b r, dilations)
    (1, 28, 28, 16, (5, 5), (1, 1), (0, 0, 0, 0), (1, 1)),  # the edge CNN's first layer
    (3, 11, 9, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),    # "same" padding, odd channel count
    (4, 13, 12, 6, (3, 2), (2, 3), (2, 0, 1, 2), (1, 1)),   # strides, uneven pads
    (2, 15, 15, 33, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),  # dilation; 33 channels: two 16-channel vectors and one
    # 1 channel, 32 + 8 outputs (the 32-channel tile), 8+8+4 wide
    (1, 13, 20, 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
]


@pytest.mark.parametrize("C, H, W, C_out, kernel, strides, pads, dil", CONVS)
def test_float_conv_relu_pool_flatten_gemm_match_onnxruntime(C, H, W, C_out, kernel, strides, pads, dil):
    w = rng.normal(size=(C_out, C, *kernel)).astype(np.float32)
    b = rng.normal(size=C_out).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=kernel, strides=strides, pads=pads,
                              dilations=dil),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=(2, 2), strides=(2, 2)),
             helper.make_node("Relu", ["p"], ["pr"]),  # after a pooling: a ReLU layer of its own
             helper.make_node("MaxPool", ["pr"], ["q"], kernel_shape=(3, 2), strides=(1, 2), pads=(1, 0, 1, 1)),
             helper.make_node("Flatten", ["q"], ["f"], axis=1)]
    probe = _ort(_graph(nodes, {"w": w, "b": b}, (C, H, W), "f"), np.zeros((1, C, H, W), np.float32))
    F = probe.shape[1]
    g1 = rng.normal(size=(F, 7)).astype(np.float32)  # transB 0: [in, out]
    g2 = rng.normal(size=(3, 7)).astype(np.float32)  # transB 1: [out, in]
    nodes += [helper.make_node("Gemm", ["f", "g1", "gb1"], ["h"], alpha=0.5, beta=2.0),
              helper.make_node("Relu", ["h"], ["hr"]),
              helper.make_node("Gemm", ["hr", "g2", "gb2"], ["y"], transB=1)]
    model = _graph(nodes, {"w": w, "b": b, "g1": g1, "gb1": rng.normal(size=7).astype(np.float32), "g2": g2,
                           "gb2": rng.normal(size=3).astype(np.float32)}, (C, H, W))
    x = rng.normal(size=(5, C, H, W)).astype(np.float32)
    want = _ort(model, x)
    net = _net(model, (C, H, W))
    # ReLUs after a conv or FC are flags of that layer
    assert [(layer[0], layer[3:]) for layer in net.layers] == [
        (native_net.CONV, (True,)), (native_net.MAXPOOL, ()), (native_net.RELU, ()), (native_net.MAXPOOL, ()),
        (native_net.GEMM, (True,)), (native_net.GEMM, ())]
    got = net.run(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())  # observed ~1e-6
    assert np.array_equal(_net(model, (C, H, W), threads=2).run(x), got)  # batch split: same floats


def test_cast_of_initializers_is_folded_and_float16_weights_are_used():
    w16 = rng.normal(size=(4, 6)).astype(np.float16)
    nodes = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
             helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    model = _graph(nodes, {"w16": w16, "b": np.ones(4, np.float32)}, (6,))
    x = rng.normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_allclose(_net(model, (6,)).run(x), _ort(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("node, why", [
    (helper.make_node("Sigmoid", ["x"], ["y"]), "op 'Sigmoid' is not one the native net runs"),
    (helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=(2, 2), ceil_mode=1), "only 2-D, floor"),
    (helper.make_node("Flatten", ["x"], ["y"], axis=2), "Flatten\\): axis 2"),
    (helper.make_node("Conv", ["x", "wd"], ["y"], kernel_shape=(1, 1), group=2), "only 2-D group-1"),
    (helper.make_node("Conv", ["x", "x"], ["y"], kernel_shape=(1, 1)), "is not an initializer"),
])
def test_unsupported_nodes_are_named(node, why):
    model = _graph([node], {"wd": np.ones((2, 1, 1, 1), np.float32)}, (2, 4, 4))
    with pytest.raises(native_net.Unsupported, match=why):
        native_net.plan(model, {}, (2, 4, 4))
    assert native_net.build(model, {}, (2, 4, 4)) is None


def test_net_checks_sizes_and_arrays():
    mod = fastscan.native()
    gemm = native_net._sizes(C=6, C_out=4)
    with pytest.raises(ValueError, match="array 0: expected at least 96 bytes, got 92"):
        mod.net_new([(native_net.GEMM, gemm, (np.zeros(23, np.float32), np.zeros(4, np.float32)))])
    with pytest.raises(ValueError, match="layer 1 takes 5 values, layer 0 gives 4"):
        mod.net_new([(native_net.GEMM, gemm, (np.zeros(24, np.float32), np.zeros(4, np.float32))),
                     (native_net.RELU, native_net._sizes(C=5), ())])
    with pytest.raises(ValueError, match="unknown kind 9"):
        mod.net_new([(9, gemm, ())])
    with pytest.raises(ValueError, match="inconsistent sizes"):  # output rows past the input
        mod.net_new([(native_net.MAXPOOL, native_net._sizes(C=1, H=4, W=4, kh=2, kw=2, sh=2, sw=2, OH=3, OW=2), ())])
    net = native_net.NativeNet([(native_net.RELU, native_net._sizes(C=5), ())], (5,))
    with pytest.raises(ValueError, match="x: expected at least 40 bytes, got 20"):
        mod.net_run(net._net, np.zeros(5, np.float32), np.zeros(10, np.float32), 2)


# ------------------------------------------------------------------------------------ the edge CNN


@pytest.fixture(scope="module")
def held_out():
    from modelstore.interface import to_input

    return to_input(load_mnist(REPO / "data" / "mnist", "test").images[:1000])


def test_shipped_edge_cnn_runs_as_one_net_and_matches_segments(held_out):
    direct = load_runtime("qcnn", SHIPPED)
    assert hasattr(direct._run, "net"), "the shipped edge CNN should run as one native net"
    kinds = [layer[0] for layer in direct._run.net.layers]  # conv+relu, pool, PQ conv+relu, pool, PQ FC+relu, FC
    assert kinds == [native_net.CONV, native_net.MAXPOOL, native_net.PQCONV, native_net.MAXPOOL, native_net.PQGEMM,
                     native_net.GEMM]
    segments = load_runtime("qcnn", SHIPPED, mode="segments")
    assert not hasattr(segments._run, "net")
    y_net, y_seg = direct.predict(held_out), segments.predict(held_out)
    # Same PQ kernels; the float layers sum in another order (the net's first conv is direct, with FMAs, not
    # onnxruntime's im2col product), which can move a table entry's 8-bit rounding by one step.
    assert float((y_net.argmax(1) == y_seg.argmax(1)).mean()) >= 0.999  # observed 1.0
    assert np.abs(y_net - y_seg).max() <= 5e-3 * np.abs(y_seg).max()  # observed 1.1e-3 relative
    assert np.array_equal(load_runtime("qcnn", SHIPPED, threads=2).predict(held_out), y_net)


def test_two_thread_nets_called_from_many_threads_give_the_same_outputs(held_out):
    """The C helper thread serves one caller at a time; the others run on their own thread."""
    from concurrent.futures import ThreadPoolExecutor

    one = load_runtime("qcnn", SHIPPED).predict(held_out[:96])
    two = load_runtime("qcnn", SHIPPED, threads=2)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: two.predict(held_out[:96]), range(24)))
    assert all(np.array_equal(o, one) for o in outs)


def test_every_path_gives_the_same_net_outputs(held_out):
    net = load_runtime("qcnn", SHIPPED)._run.net
    outs = {}
    for path in fastscan.paths():  # scalar always; avx2 / avx512bw / neon where the CPU has them
        net.path = path
        outs[path] = net.run(held_out[:64])
    assert all(np.array_equal(o, outs["scalar"]) for o in outs.values())  # paths give the same integer sums


def test_graph_with_an_unsupported_node_falls_back_to_segments(tmp_path, held_out):
    model = onnx.load(SHIPPED)
    out = model.graph.output[0].name
    model.graph.node[-1].output[0] = "pre"  # logits -> Sigmoid -> output
    model.graph.node.append(helper.make_node("Sigmoid", ["pre"], [out]))
    path = tmp_path / "sigmoid.qcnn.onnx"
    onnx.save(model, path)
    rt = load_runtime("qcnn", path)
    assert not hasattr(rt._run, "net")
    logits = load_runtime("qcnn", SHIPPED, mode="segments").predict(held_out[:50])
    np.testing.assert_allclose(rt.predict(held_out[:50]), 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-6)
