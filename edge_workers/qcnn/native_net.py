"""A whole Q-CNN graph as one native net: every layer runs in one C call (``_fastscan.net_run``).

Between two PQ layers a small CNN has a ReLU, a pooling and a flatten. Run as onnxruntime sessions
called from Python (the runtime's ``segments`` mode) they cost more than the PQ layers at batch 1:
edge CNN, 1 thread, 96 of 151 us in three sessions. When every node of a graph is one of the layers
below, :func:`build` turns it into a net the C code runs sample by sample (activations stay in the
cache, the GIL is released once per call); otherwise it says why and the runtime uses segments.

Supported, in one chain (each node reads the previous node's output; weights are initializers):
``PQConv``/``PQGemm`` on the fast-scan kernels (K <= 16), ``Conv`` (group 1, explicit pads),
``Gemm`` (transA 0, constant B and C), ``Relu``, ``MaxPool`` (2-D, no dilation, floor),
``Flatten`` (axis 1), and ``Cast`` of initializers (folded at load).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from edge_workers.qcnn import fastscan
from edge_workers.qcnn.kernels import conv_out_size

logger = logging.getLogger(__name__)

CONV, PQCONV, PQGEMM, GEMM, RELU, MAXPOOL = range(1, 7)  # layer kinds of native/net.h
FUSES_RELU = (CONV, PQCONV, PQGEMM, GEMM)  # a ReLU after these is their relu flag, not a layer of its own
GEOMETRY = ("N", "C", "H", "W", "M", "K", "dsub", "Mg", "Mp", "C_out", "group", "kh", "kw", "sh", "sw",
            "pt", "pl", "pb", "pr", "dh", "dw", "OH", "OW")  # the sizes tuple, as conv()'s


class Unsupported(Exception):
    """The graph has a node the native net does not run; the message says which and why."""


def _sizes(**given) -> tuple[int, ...]:
    values = {"H": 1, "W": 1, **given}
    return tuple(int(values.get(k, 0)) for k in GEOMETRY)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _window(node, a: dict, C: int, H: int, W: int) -> dict:
    """Geometry of a 2-D sliding window (Conv, MaxPool) over [C, H, W] with explicit pads."""
    kh, kw = a.get("kernel_shape") or (None, None)
    if kh is None:
        raise Unsupported(f"node {node.name!r} ({node.op_type}): no kernel_shape")
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise Unsupported(f"node {node.name!r} ({node.op_type}): auto_pad {a['auto_pad']!r}")
    sh, sw = a.get("strides", (1, 1))
    dh, dw = a.get("dilations", (1, 1))
    pt, pl, pb, pr = a.get("pads", (0, 0, 0, 0))
    OH, OW = conv_out_size(H, kh, sh, pt, pb, dh), conv_out_size(W, kw, sw, pl, pr, dw)
    return {"C": C, "H": H, "W": W, "kh": kh, "kw": kw, "sh": sh, "sw": sw, "pt": pt, "pl": pl, "pb": pb, "pr": pr,
            "dh": dh, "dw": dw, "OH": OH, "OW": OW}


def _const(consts: dict, name: str, node) -> np.ndarray:
    if name not in consts:
        raise Unsupported(f"node {node.name!r} ({node.op_type}): input {name!r} is not an initializer")
    return consts[name]


def plan(model, pq_layers: dict, input_dims) -> tuple[list, tuple[int, ...]]:
    """(layers for ``net_new``, per-sample output shape) of an ONNX graph; raises Unsupported.

    A layer is (kind, sizes, arrays) or (kind, sizes, arrays, True) when a ReLU follows it.

    pq_layers: PQ node output name -> the prepared layer of each PQ node (``fastscan.FastScanConv``/``FastScanGemm``).
    input_dims: per-sample input shape, e.g. (1, 28, 28).
    """
    from onnx import helper, numpy_helper

    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    inputs = [v.name for v in g.input if v.name not in consts]
    cur, shape, layers = inputs[0], tuple(int(d) for d in input_dims), []
    for node in g.node:
        op, a = node.op_type, _attrs(node)
        if op == "Cast" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]].astype(helper.tensor_dtype_to_np_dtype(a["to"]))
            continue
        if not node.input or node.input[0] != cur:
            raise Unsupported(f"node {node.name!r} ({op}) does not read the previous layer's output {cur!r}")
        if op == "Relu":
            if layers and layers[-1][0] in FUSES_RELU and len(layers[-1]) == 3:
                layers[-1] = (*layers[-1], True)  # the layer's relu flag: applied while its output is hot
            else:
                layers.append((RELU, _sizes(C=math.prod(shape)), ()))
        elif op == "Flatten":
            if a.get("axis", 1) != 1:
                raise Unsupported(f"node {node.name!r} (Flatten): axis {a['axis']}")
            shape = (math.prod(shape),)
        elif op == "MaxPool":
            if len(shape) != 3 or a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", (1, 1))) \
                    or a.get("storage_order", 0) or len(node.output) > 1:
                raise Unsupported(f"node {node.name!r} (MaxPool): only 2-D, floor, undilated, one output")
            geo = _window(node, a, *shape)
            layers.append((MAXPOOL, _sizes(**geo), ()))
            shape = (shape[0], geo["OH"], geo["OW"])
        elif op == "Conv":
            w = _const(consts, node.input[1], node).astype(np.float32)
            if len(shape) != 3 or a.get("group", 1) != 1 or w.ndim != 4 or w.shape[1] != shape[0]:
                raise Unsupported(f"node {node.name!r} (Conv): only 2-D group-1 convolutions of [C, H, W] inputs")
            b = (_const(consts, node.input[2], node) if len(node.input) > 2 and node.input[2]
                 else np.zeros(w.shape[0]))
            geo = _window(node, a, *shape)
            w2 = np.ascontiguousarray(w.reshape(w.shape[0], -1))
            layers.append((CONV, _sizes(**geo, C_out=w.shape[0], group=1),
                           (w2, np.ascontiguousarray(b, np.float32))))
            shape = (w.shape[0], geo["OH"], geo["OW"])
        elif op == "Gemm":
            layers.append(_gemm(node, a, consts, shape))
            shape = (layers[-1][1][GEOMETRY.index("C_out")],)
        elif op in ("PQConv", "PQGemm"):
            layer = pq_layers.get(node.output[0])
            if not isinstance(layer, (fastscan.FastScanConv, fastscan.FastScanGemm)):
                raise Unsupported(f"node {node.name!r} ({op}) runs on the numba kernels (K > 16 or kernels=numba)")
            layers.append(_pq(node, layer, shape))
            shape = _pq_shape(layer, layers[-1][1])
        else:
            raise Unsupported(f"node {node.name!r}: op {op!r} is not one the native net runs")
        cur = node.output[0]
    if cur != g.output[0].name:
        raise Unsupported(f"the graph output {g.output[0].name!r} is not the last layer's output {cur!r}")
    if not layers:
        raise Unsupported("the graph has no layers")
    return layers, shape


def _gemm(node, a: dict, consts: dict, shape) -> tuple:
    if len(shape) != 1 or a.get("transA", 0):
        raise Unsupported(f"node {node.name!r} (Gemm): only a flat input, transA 0")
    w = _const(consts, node.input[1], node).astype(np.float32) * np.float32(a.get("alpha", 1.0))
    w = w if a.get("transB", 0) else w.T  # -> [C_out, C]
    if w.ndim != 2 or w.shape[1] != shape[0]:
        raise Unsupported(f"node {node.name!r} (Gemm): weights {w.shape} for {shape[0]} inputs")
    b = (_const(consts, node.input[2], node).astype(np.float32) * np.float32(a.get("beta", 1.0))
         if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0], np.float32))
    try:
        b = np.broadcast_to(b.reshape(-1) if b.size == w.shape[0] else b, (w.shape[0],))
    except ValueError as err:
        raise Unsupported(f"node {node.name!r} (Gemm): bias {b.shape} for {w.shape[0]} outputs") from err
    return (GEMM, _sizes(C=shape[0], C_out=w.shape[0]), (np.ascontiguousarray(w), np.ascontiguousarray(b)))


def _pq(node, layer, shape) -> tuple:
    arrays = (layer.cbt, layer.packed, layer.bias)
    if isinstance(layer, fastscan.FastScanGemm):
        if len(shape) != 1 or shape[0] != layer.M * layer.dsub:
            raise Unsupported(f"node {node.name!r} (PQGemm): input {shape}, expected ({layer.M * layer.dsub},)")
        return (PQGEMM, _sizes(C=shape[0], M=layer.M, K=layer.K, dsub=layer.dsub, Mp=layer.Mp, C_out=layer.C_out),
                arrays)
    if len(shape) != 3 or shape[0] != layer.M * layer.dsub:
        raise Unsupported(f"node {node.name!r} (PQConv): input {shape}, expected {layer.M * layer.dsub} channels")
    C, H, W = shape
    (kh, kw), (sh, sw), (dh, dw), (pt, pl, pb, pr) = layer.kernel, layer.strides, layer.dilations, layer.pads
    OH, OW = layer.out_size(H, W)
    return (PQCONV, _sizes(C=C, H=H, W=W, M=layer.M, K=layer.K, dsub=layer.dsub, Mg=layer.Mg, Mp=layer.Mp,
                           C_out=layer.C_out, group=layer.group, kh=kh, kw=kw, sh=sh, sw=sw, pt=pt, pl=pl, pb=pb,
                           pr=pr, dh=dh, dw=dw, OH=OH, OW=OW), arrays)


def _pq_shape(layer, sizes) -> tuple[int, ...]:
    if isinstance(layer, fastscan.FastScanGemm):
        return (layer.C_out,)
    return (layer.C_out, sizes[GEOMETRY.index("OH")], sizes[GEOMETRY.index("OW")])


class NativeNet:
    """A planned graph on the C net: ``run(x)`` x float32 [N, *input_dims] -> float32 [N, *out_shape].

    threads > 1: the caller and the C code's helper thread take a batch's samples one by one.
    """

    def __init__(self, layers: list, out_shape: tuple[int, ...], threads: int = 1, path: str = ""):
        self._mod = fastscan._module_or_raise()
        self._net = self._mod.net_new(layers)  # checks every layer's sizes and arrays
        self.layers, self.out_shape, self.threads, self.path = layers, out_shape, max(1, threads), path

    def run(self, x: np.ndarray) -> np.ndarray:
        y = np.empty((len(x), *self.out_shape), np.float32)
        self._run(x, y)
        return y

    def profile(self, x: np.ndarray, repeats: int = 1) -> np.ndarray:
        """float64 [len(layers)]: microseconds per sample in each layer (one thread, median of `repeats` calls).

        x: float32 [N, *input_dims]. A layer's time includes its input's transpose to the layout it runs in
        (native/net.h: window layers channels-last, FC layers flat) and, for the last layer, the output's.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty((len(x), *self.out_shape), np.float32)
        runs = [self._mod.net_profile(self._net, x, y, len(x), self.path) for _ in range(max(1, repeats))]
        return np.median(np.asarray(runs, np.float64), axis=0) / 1e3 / max(1, len(x))

    def _run(self, x: np.ndarray, y: np.ndarray) -> None:
        # threads > 1: the C code shares the batch with its own helper thread, which spins between calls (a
        # Python pool thread sleeps, and waking it cost as much as the split saved on this VM).
        self._mod.net_run(self._net, x, y, len(x), self.path, min(self.threads, 2))


def build(model, pq_layers: dict, input_dims, threads: int = 1) -> NativeNet | None:
    """The graph as a NativeNet, or None (logged at debug level with the reason) when a node is not supported."""
    try:
        layers, out_shape = plan(model, pq_layers, input_dims)
    except Unsupported as why:
        logger.debug("Q-CNN graph runs as onnxruntime segments: %s", why)
        return None
    return NativeNet(layers, out_shape, threads)
