"""Cutting a chain ONNX model (float or Q-CNN) at every legal point into a head and a tail ONNX model.

A cut sits after a node whose op is in CUT_OPS (Relu, MaxPool, Flatten, Gemm, PQConv, PQGemm)
when exactly one activation tensor, that node's output, is produced before the cut and read after
it (initializers and tensors computed from initializers alone, such as the Q-CNN file's weight
Casts, do not count: they are copied to whichever side reads them). The head maps the model input
[batch, 1, 28, 28] to the cut tensor [batch, *shape]; the tail maps that tensor, under the same
name, to the model output. Both keep the model's opsets, IR version and metadata; the Q-CNN
domain `ai.edgeq` is imported by a part only when it holds PQ nodes, so a part without them is a
standard ONNX file (runtime ``onnx``) and one with them a Q-CNN file (runtime ``qcnn``).

Cut points are named by op kind and ordinal over the whole chain (conv, relu, pool, flatten, fc):
``edge_cnn@pool1`` is after the first MaxPool of models/edge_cnn.onnx, ``edge_cnn.qcnn@fc1`` after
the first Gemm or PQGemm of models/edge_cnn.qcnn.onnx.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

QCNN_DOMAIN = "ai.edgeq"  # the Q-CNN custom domain (edge_workers.qcnn.export.DOMAIN; that layer is above this one)
PQ_OPS = ("PQConv", "PQGemm")
# op type -> cut point kind; every op of a kind is numbered, cut or not, so names are stable across variants.
KINDS = {"Conv": "conv", "PQConv": "conv", "Relu": "relu", "MaxPool": "pool", "Flatten": "flatten",
         "Gemm": "fc", "PQGemm": "fc"}
CUT_OPS = ("Relu", "MaxPool", "Flatten", "Gemm", "PQConv", "PQGemm")


class PartitionError(ValueError):
    """A model cannot be cut as asked (no such cut point, more than one tensor live, not a chain)."""


@dataclass(frozen=True)
class Cut:
    """One legal cut point of a model.

    cut_id: "<model name>@<point>"; tensor: the graph tensor crossing the cut; shape: its per-sample
    shape (batch dim excluded); after: index in the graph's node list of the node producing it.
    """

    cut_id: str
    point: str
    tensor: str
    shape: tuple[int, ...]
    after: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def model_name(path: str | Path) -> str:
    """The model part of cut ids: the file name without ``.onnx`` ("edge_cnn", "edge_cnn.qcnn")."""
    name = Path(path).name
    return name[: -len(".onnx")] if name.endswith(".onnx") else name


def _constant_outputs(graph) -> set[str]:
    """Initializers and every tensor computed from initializers alone (weight Casts, Constant nodes)."""
    const = {t.name for t in graph.initializer}
    for node in graph.node:
        if all(not n or n in const for n in node.input):
            const.update(n for n in node.output if n)
    return const


def _is_const_node(node, const: set[str]) -> bool:
    return bool(node.output) and all(n in const for n in node.output if n)


def tensor_shapes(model) -> dict[str, tuple]:
    """Per-sample shapes of the graph's float activations: ONNX shape inference, PQ nodes from their attributes."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for _ in range(len(m.graph.node) + 1):
        m = onnx.shape_inference.infer_shapes(m)
        known = {v.name: v for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)
                 if v.type.tensor_type.HasField("shape")}
        added = False
        for node in m.graph.node:
            if node.op_type in PQ_OPS and node.output[0] not in known and node.input[0] in known:
                dims = [d.dim_value if d.HasField("dim_value") else d.dim_param
                        for d in known[node.input[0]].type.tensor_type.shape.dim]
                m.graph.value_info.append(helper.make_tensor_value_info(
                    node.output[0], onnx.TensorProto.FLOAT, [dims[0], *_pq_out_dims(node, dims[1:])]))
                added = True
        if not added:
            break
    shapes = {}
    for name, v in known.items():
        dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        if len(dims) >= 2 and all(isinstance(d, int) and d > 0 for d in dims[1:]):
            shapes[name] = tuple(dims[1:])
    return shapes


def _pq_out_dims(node, in_dims: list) -> list[int]:
    from onnx import helper

    a = {x.name: int(helper.get_attribute_value(x)) for x in node.attribute}
    if node.op_type == "PQGemm":
        return [a["out_features"]]
    h, w = in_dims[1], in_dims[2]
    oh = (h + a["pad_top"] + a["pad_bottom"] - a["dilation_h"] * (a["kernel_h"] - 1) - 1) // a["stride_h"] + 1
    ow = (w + a["pad_left"] + a["pad_right"] - a["dilation_w"] * (a["kernel_w"] - 1) - 1) // a["stride_w"] + 1
    return [a["out_channels"], oh, ow]


def find_cuts(model, name: str) -> list[Cut]:
    """Every legal cut of `model` (onnx.ModelProto), in graph order; `name` is the model part of the ids."""
    g = model.graph
    const = _constant_outputs(g)
    inputs = [v.name for v in g.input if v.name not in const]
    if len(inputs) != 1 or len(g.output) != 1:
        raise PartitionError(f"{name}: expected one input and one output, got {inputs} -> {[o.name for o in g.output]}")
    shapes = tensor_shapes(model)
    outputs = {o.name for o in g.output}
    counts: dict[str, int] = {}
    produced: set[str] = {inputs[0]}
    cuts = []
    nodes = list(g.node)
    for i, node in enumerate(nodes):
        if _is_const_node(node, const):
            continue
        kind = KINDS.get(node.op_type)
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
        produced.update(n for n in node.output if n)
        if node.op_type not in CUT_OPS or node.output[0] in outputs:
            continue
        read_after = {n for later in nodes[i + 1:] if not _is_const_node(later, const) for n in later.input}
        live = sorted((produced & read_after) | (produced & outputs))
        if live != [node.output[0]]:
            logger.debug("%s: no cut after %s, live tensors %s", name, node.name, live)
            continue
        if node.output[0] not in shapes:
            raise PartitionError(f"{name}: tensor {node.output[0]!r} after {node.name!r} has no static shape")
        point = f"{kind}{counts[kind]}"
        cuts.append(Cut(f"{name}@{point}", point, node.output[0], shapes[node.output[0]], i))
    return cuts


def _part(model, nodes: list, input_vi, output_vis: list, graph_name: str):
    """A standalone model of `nodes` (plus the constant nodes and initializers they need)."""
    import onnx
    from onnx import helper

    g = model.graph
    const = _constant_outputs(g)
    need = {n for node in nodes for n in node.input if n}
    const_nodes = []
    for node in reversed(list(g.node)):  # constant producers of what the part reads, transitively
        if _is_const_node(node, const) and any(o in need for o in node.output):
            const_nodes.append(node)
            need.update(n for n in node.input if n)
    const_nodes.reverse()
    body = const_nodes + nodes
    inits = [t for t in g.initializer if t.name in need]
    graph = helper.make_graph(body, graph_name, [input_vi], output_vis, inits)
    uses_pq = any(n.domain == QCNN_DOMAIN for n in body)
    opsets = [o for o in model.opset_import if o.domain != QCNN_DOMAIN or uses_pq]
    part = helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version,
                             producer_name="edgeq partition")
    for p in model.metadata_props:
        part.metadata_props.add(key=p.key, value=p.value)
    onnx.checker.check_model(part)
    return part


def _value_info(name: str, batch: str, shape: tuple[int, ...]):
    import onnx
    from onnx import helper

    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [batch, *shape])


def split(model, cut: Cut):
    """(head, tail) onnx.ModelProto of `model` at `cut`; both pass onnx.checker, batch dim symbolic."""
    g = model.graph
    const = _constant_outputs(g)
    inp = next(v for v in g.input if v.name not in const)
    batch_dim = inp.type.tensor_type.shape.dim[0]
    batch = batch_dim.dim_param or "batch"
    nodes = list(g.node)
    head_nodes = [n for n in nodes[: cut.after + 1] if not _is_const_node(n, const)]
    tail_nodes = [n for n in nodes[cut.after + 1:] if not _is_const_node(n, const)]
    if not tail_nodes:
        raise PartitionError(f"{cut.cut_id}: nothing after the cut")
    cut_vi = _value_info(cut.tensor, batch, cut.shape)
    head = _part(model, head_nodes, inp, [cut_vi], f"{g.name or 'model'}_head_{cut.point}")
    tail = _part(model, tail_nodes, cut_vi, list(g.output), f"{g.name or 'model'}_tail_{cut.point}")
    return head, tail


def segment(model, start: Cut | None, end: Cut | None):
    """The model between two cuts (None: the model's input / output), for per-layer profiles."""
    g = model.graph
    const = _constant_outputs(g)
    inp = next(v for v in g.input if v.name not in const)
    batch = inp.type.tensor_type.shape.dim[0].dim_param or "batch"
    lo = start.after + 1 if start else 0
    hi = end.after + 1 if end else len(g.node)
    nodes = [n for n in list(g.node)[lo:hi] if not _is_const_node(n, const)]
    if not nodes:
        raise PartitionError(f"no layers between {start and start.cut_id} and {end and end.cut_id}")
    in_vi = _value_info(start.tensor, batch, start.shape) if start else inp
    out_vis = [_value_info(end.tensor, batch, end.shape)] if end else list(g.output)
    name = f"{start.point if start else 'input'}_{end.point if end else 'output'}"
    return _part(model, nodes, in_vi, out_vis, name)


def runtime_key(model) -> str:
    """The edgeq runtime that runs a model or part: ``qcnn`` when it holds PQ nodes, else ``onnx``."""
    return "qcnn" if any(n.domain == QCNN_DOMAIN for n in model.graph.node) else "onnx"
