"""Reading float ONNX models for Q-CNN: validation, normalisation to Conv/Gemm layers, calibration runs.

``load_float_model`` checks every node against ``SUPPORTED_OPS`` and rewrites
the graph so that each linear layer is exactly one node with float32
initializers ``<layer>.weight`` / ``<layer>.bias``: a ``Conv`` (BatchNormalization
after it folded in) or a ``Gemm`` with transB=1 (alpha/beta folded, MatMul(+Add)
merged). ``activations`` runs such a model in onnxruntime with chosen
intermediate tensors exposed as outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from publishers.errors import EdgeqError

SUPPORTED_OPS = ("Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool", "Flatten", "Reshape", "Softmax",
                 "BatchNormalization", "Constant")


class UnsupportedModelError(EdgeqError, ValueError):
    """The float model has an op, attribute or shape the Q-CNN compressor does not handle."""


@dataclass
class LinearLayer:
    """One Conv or Gemm of a normalised model.

    weight: float32 [C_out, C_in/group, kh, kw] (conv) or [C_t, C_s] (fc); bias: float32 [C_out].
    pads: (top, left, bottom, right).
    """

    name: str
    kind: str  # "conv" | "fc"
    input: str
    output: str
    weight: np.ndarray
    bias: np.ndarray
    strides: tuple = (1, 1)
    pads: tuple = (0, 0, 0, 0)
    dilations: tuple = (1, 1)
    group: int = 1
    sources: list = field(default_factory=list)  # original node names

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:]) if self.kind == "conv" else (1, 1)

    @property
    def in_dims(self) -> int:
        """Input dims per group: C_in/group (conv) or C_s (fc)."""
        return self.weight.shape[1]

    @property
    def float_params(self) -> int:
        return self.weight.size + self.bias.size


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _unsupported(node, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"node {node.name or node.output[0]!r} ({node.op_type}): {why}")


def load_float_model(path):
    """Load, validate and normalise a float ONNX model.

    Returns (model: onnx.ModelProto, layers: list[LinearLayer]) in graph order; the model's
    Conv/Gemm nodes are named after their layers and read weights from ``<name>.weight``.
    Raises UnsupportedModelError naming the node for anything outside SUPPORTED_OPS.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"{path}: expected one graph input, got {[i.name for i in inputs]}")
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            raise _unsupported(node, f"op not supported by the Q-CNN compressor; supported ops: "
                                     f"{', '.join(SUPPORTED_OPS)}")
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in g.output}

    def only_consumer(node, op_type):
        users = consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == op_type and node.output[0] not in graph_outputs:
            return users[0]
        return None

    layers, new_nodes, skip = [], [], set()
    for node in g.node:
        if id(node) in skip:
            continue
        if node.op_type == "Conv":
            layer, tail = _conv_layer(node, inits, only_consumer(node, "BatchNormalization"))
        elif node.op_type in ("Gemm", "MatMul"):
            tail = only_consumer(node, "Add") if node.op_type == "MatMul" else None
            layer = _fc_layer(node, inits, tail)
        elif node.op_type == "BatchNormalization":
            raise _unsupported(node, "BatchNormalization is supported only directly after a Conv (it is folded in)")
        elif node.op_type == "Add":
            raise _unsupported(node, "Add is supported only as the bias of a MatMul with a constant vector")
        else:
            new_nodes.append(node)
            continue
        if tail is not None:
            skip.add(id(tail))
            layer.output = tail.output[0]
            layer.sources.append(tail.name)
        layers.append(layer)
        new_nodes.append(_layer_node(layer))
    used = {n for node in new_nodes for n in node.input}
    keep = [t for t in g.initializer if t.name in used and not any(t.name.startswith(ly.name + ".") for ly in layers)]
    keep += [t for ly in layers for t in _layer_initializers(ly)]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.input[:]
    g.input.extend(inputs)
    del g.value_info[:]
    return model, layers


def _ints(v, n, default):
    v = list(v) if v is not None else [default] * n
    return tuple(int(i) for i in v)


def _const(node, inits, name, what):
    if name not in inits:
        raise _unsupported(node, f"{what} {name!r} must be an initializer (constant)")
    return inits[name].astype(np.float32)


def _conv_layer(node, inits, bn):
    a = _attrs(node)
    w = _const(node, inits, node.input[1], "weight")
    if w.ndim != 4:
        raise _unsupported(node, f"only 2-D convolutions (weight [C_out, C_in/group, kh, kw]) are supported, "
                                 f"got weight shape {list(w.shape)}")
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        raise _unsupported(node, f"auto_pad={a['auto_pad']!r} unsupported; use explicit pads")
    b = (_const(node, inits, node.input[2], "bias") if len(node.input) > 2 and node.input[2]
         else np.zeros(len(w), np.float32))
    name = node.name or node.output[0]
    layer = LinearLayer(name, "conv", node.input[0], node.output[0], w, b,
                        strides=_ints(a.get("strides"), 2, 1), pads=_ints(a.get("pads"), 4, 0),
                        dilations=_ints(a.get("dilations"), 2, 1), group=int(a.get("group", 1)), sources=[node.name])
    if bn is not None:
        scale, beta, mean, var = (_const(bn, inits, n, "BatchNormalization parameter") for n in bn.input[1:5])
        k = scale / np.sqrt(var + float(_attrs(bn).get("epsilon", 1e-5)))
        layer.weight = (w * k[:, None, None, None]).astype(np.float32)
        layer.bias = ((b - mean) * k + beta).astype(np.float32)
        return layer, bn
    return layer, None


def _fc_layer(node, inits, add):
    a = _attrs(node)
    w = _const(node, inits, node.input[1], "weight")
    if w.ndim != 2:
        raise _unsupported(node, f"weight must be 2-D, got shape {list(w.shape)}")
    if node.op_type == "Gemm":
        if a.get("transA", 0):
            raise _unsupported(node, "transA=1 is not supported")
        w = w if a.get("transB", 0) else w.T
        w = w * float(a.get("alpha", 1.0))
        if len(node.input) > 2 and node.input[2]:
            c = _const(node, inits, node.input[2], "bias") * float(a.get("beta", 1.0))
            b = np.broadcast_to(c.reshape(-1), (w.shape[0],)).copy() if c.size in (1, w.shape[0]) else None
            if b is None:
                raise _unsupported(node, f"bias C must have 1 or {w.shape[0]} values, got shape {list(c.shape)}")
        else:
            b = np.zeros(w.shape[0], np.float32)
    else:
        w = w.T
        b = np.zeros(w.shape[0], np.float32)
        if add is not None:
            other = [n for n in add.input if n != node.output[0]]
            if len(other) != 1 or other[0] not in inits or inits[other[0]].size not in (1, w.shape[0]):
                raise _unsupported(add, f"Add after MatMul must add a constant of {w.shape[0]} values")
            b = np.broadcast_to(inits[other[0]].astype(np.float32).reshape(-1), (w.shape[0],)).copy()
    name = node.name or node.output[0]
    return LinearLayer(name, "fc", node.input[0], node.output[0], np.ascontiguousarray(w, np.float32),
                       np.asarray(b, np.float32), sources=[node.name])


def _layer_node(layer: LinearLayer):
    from onnx import helper

    ins = [layer.input, f"{layer.name}.weight", f"{layer.name}.bias"]
    if layer.kind == "conv":
        return helper.make_node("Conv", ins, [layer.output], name=layer.name, kernel_shape=list(layer.kernel),
                                strides=list(layer.strides), pads=list(layer.pads),
                                dilations=list(layer.dilations), group=layer.group)
    return helper.make_node("Gemm", ins, [layer.output], name=layer.name, transB=1)


def _layer_initializers(layer: LinearLayer, weight=None, bias=None):
    from onnx import numpy_helper

    w = layer.weight if weight is None else weight
    b = layer.bias if bias is None else bias
    return [numpy_helper.from_array(np.ascontiguousarray(w, np.float32), f"{layer.name}.weight"),
            numpy_helper.from_array(np.ascontiguousarray(b, np.float32), f"{layer.name}.bias")]


def with_weights(model, layers: list[LinearLayer], weights: dict):
    """Copy of a normalised model with some layers' weights replaced.

    weights: layer name -> (weight float32 like layer.weight, bias float32 [C_out]).
    """
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_name = {ly.name: ly for ly in layers}
    replace = {}
    for name, (w, b) in weights.items():
        for t in _layer_initializers(by_name[name], np.reshape(w, by_name[name].weight.shape), b):
            replace[t.name] = t
    for i, t in enumerate(out.graph.initializer):
        if t.name in replace:
            out.graph.initializer[i].CopyFrom(replace[t.name])
    return out


def activations(model, x: np.ndarray, names: list[str], batch: int = 500, threads: int = 1) -> dict[str, np.ndarray]:
    """Run `model` (onnx.ModelProto) on x float32 [N, ...]; return the named tensors (float32 [N, ...]).

    A name that is the graph input is x itself; the model only runs when other names are asked for.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edge_workers.runtime import session_options

    x = np.ascontiguousarray(x, dtype=np.float32)
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    found = {n: x for n in names if n in inputs}
    names = [n for n in names if n not in inputs]
    if not names:
        return found
    m = type(model)()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have)
    sess = ort.InferenceSession(m.SerializeToString(), sess_options=session_options(threads),
                                providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    parts = [sess.run(list(names), {inp: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return {**found, **{n: np.concatenate([p[k] for p in parts]) for k, n in enumerate(names)}}
