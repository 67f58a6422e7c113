"""Q-CNN model files: writing ``ai.edgeq`` PQConv/PQGemm nodes, reading them back, standard-ONNX export.

Format (docs/qcnn-format.md): a quantized layer is one node of domain
``ai.edgeq`` (opset version 1) with inputs (X, codebook, codes, bias),
codebook float16|float32 [M, K, dsub], codes uint8 (bit-packed, or for 4-bit codes
the native kernel's ``fastscan4`` layout, attribute ``codes_layout=1``, format 2), bias
in the codebook dtype, and integer attributes describing the layer. Layers kept as
float may store float16 weights behind a standard Cast node.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_workers.qcnn.graph import LinearLayer
from edge_workers.qcnn.pq import PQWeights, pack_codes, pack_fastscan4, unpack_codes, unpack_fastscan4

DOMAIN = "ai.edgeq"
DOMAIN_VERSION = 1
FORMAT_VERSION = 2  # 2 adds codes_layout=1 (fastscan4); files without such nodes are still written as 1
READ_VERSIONS = ("1", "2")
CODES_LAYOUTS = {"bitstream": 0, "fastscan4": 1}  # codes_layout attribute values (absent = 0)
LAYOUT_CHOICES = ("auto", *CODES_LAYOUTS)  # auto: fastscan4 where codes take exactly 4 bits (9 <= K <= 16)
PQ_OPS = ("PQConv", "PQGemm")
CONV_ATTRS = ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_top", "pad_left", "pad_bottom", "pad_right",
              "dilation_h", "dilation_w", "group", "in_channels", "out_channels")
GEMM_ATTRS = ("in_features", "out_features")
COMMON_ATTRS = ("M", "K", "dsub", "nbits", "num_codes")


class QcnnFormatError(ValueError):
    """A Q-CNN file's PQ node is inconsistent (attribute vs initializer shape mismatch)."""


def codes_layout_for(pq: PQWeights, choice: str = "auto") -> int:
    """codes_layout attribute value for `pq` under CompressConfig.codes_layout `choice`.

    auto: fastscan4 when codes take exactly 4 bits (the layout then costs only its padding to
    32 outputs and 4 subspaces); K <= 8 keeps the denser bit stream and is laid out at load.
    """
    if choice not in LAYOUT_CHOICES:
        raise ValueError(f"codes layout must be one of {LAYOUT_CHOICES}, got {choice!r}")
    if choice == "fastscan4" and pq.K > 16:
        raise ValueError(f"the fastscan4 codes layout needs K <= 16, got K={pq.K}")
    if choice == "auto":
        return CODES_LAYOUTS["fastscan4"] if pq.nbits == 4 else CODES_LAYOUTS["bitstream"]
    return CODES_LAYOUTS[choice]


def pq_node(layer: LinearLayer, pq: PQWeights, codebook_dtype: str, prefix: str, codes_layout: str = "auto"):
    """(node, initializers) replacing `layer` by a PQConv/PQGemm node of domain ai.edgeq.

    Initializers are named `<prefix>.codebook`, `<prefix>.codes`, `<prefix>.bias`.
    codes_layout: "auto", "bitstream" or "fastscan4" (codes_layout_for).
    """
    from onnx import helper, numpy_helper

    n = prefix
    layout = codes_layout_for(pq, codes_layout)
    packed = pack_fastscan4(pq.codes, pq.group).reshape(-1) if layout else pack_codes(pq.codes, pq.nbits)
    inits = [numpy_helper.from_array(pq.codebook.astype(codebook_dtype), f"{n}.codebook"),
             numpy_helper.from_array(packed, f"{n}.codes"),
             numpy_helper.from_array(pq.bias.astype(codebook_dtype), f"{n}.bias")]
    attrs = {"M": pq.M, "K": pq.K, "dsub": pq.dsub, "nbits": pq.nbits, "num_codes": int(pq.codes.size)}
    if layout:  # absent means bitstream, so files without fastscan4 nodes stay readable as format 1
        attrs["codes_layout"] = layout
    if layer.kind == "conv":
        (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = layer.kernel, layer.strides, layer.pads, layer.dilations
        attrs.update(kernel_h=kh, kernel_w=kw, stride_h=sh, stride_w=sw, pad_top=pt, pad_left=pl, pad_bottom=pb,
                     pad_right=pr, dilation_h=dh, dilation_w=dw, group=layer.group,
                     in_channels=layer.in_dims * layer.group, out_channels=pq.C_out)
        op = "PQConv"
    else:
        attrs.update(in_features=layer.in_dims, out_features=pq.C_out)
        op = "PQGemm"
    node = helper.make_node(op, [layer.input, *(t.name for t in inits)], [layer.output], name=layer.name,
                            domain=DOMAIN, **attrs)
    return node, inits


def float_layer_nodes(layer: LinearLayer, dtype: str, prefix: str):
    """(nodes, initializers) for a layer kept standard, weights stored in `dtype` (Cast back if float16)."""
    from onnx import TensorProto, helper, numpy_helper

    from edge_workers.qcnn.graph import _layer_node

    node = _layer_node(layer)
    node.input[1:] = [f"{prefix}.weight", f"{prefix}.bias"]
    if dtype == "float32":
        return [node], [numpy_helper.from_array(layer.weight, node.input[1]),
                        numpy_helper.from_array(layer.bias, node.input[2])]
    nodes, inits = [], []
    for src, arr in ((node.input[1], layer.weight), (node.input[2], layer.bias)):
        inits.append(numpy_helper.from_array(arr.astype(np.float16), f"{src}16"))
        nodes.append(helper.make_node("Cast", [f"{src}16"], [src], to=TensorProto.FLOAT))
    return nodes + [node], inits


def _compact_tensor_names(graph) -> None:
    """Rename intermediate activations to t0, t1, ... (graph inputs, outputs and initializers keep theirs)."""
    fixed = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    rename: dict[str, str] = {}
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name and name not in fixed:
                rename.setdefault(name, f"t{len(rename)}")
                node.output[i] = rename[name]
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def write_qcnn(model, layers: list[LinearLayer], plan: dict, codebook_dtype: str, path,
               codes_layout: str = "auto") -> int:
    """Write a Q-CNN file from a normalised float model; returns the file size in bytes.

    plan: layer name -> PQWeights (quantized) or "float16" / "float32" (kept standard).
    codes_layout: how PQ codes are stored ("auto", "bitstream", "fastscan4"; codes_layout_for).
    """
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    by_node = {ly.name: ly for ly in layers}
    names = {f"{ly.name}.{s}" for ly in layers for s in ("weight", "bias")}
    keep_inits = [t for t in g.initializer if t.name not in names]
    nodes, inits = [], []
    index = {ly.name: i for i, ly in enumerate(layers)}
    for node in g.node:
        layer = by_node.get(node.name) if node.op_type in ("Conv", "Gemm") else None
        if layer is None:
            nodes.append(node)
            continue
        choice, prefix = plan[layer.name], f"L{index[layer.name]}"
        if isinstance(choice, PQWeights):
            nd, its = pq_node(layer, choice, codebook_dtype, prefix, codes_layout)
            nodes.append(nd)
        else:
            nds, its = float_layer_nodes(layer, choice, prefix)
            nodes.extend(nds)
        inits.extend(its)
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(keep_inits + inits)
    _compact_tensor_names(g)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    del out.metadata_props[:]
    fastscan4 = any(a.name == "codes_layout" and a.i for nd in nodes for a in nd.attribute)
    helper.set_model_props(out, {"edgeq.qcnn.format": str(FORMAT_VERSION if fastscan4 else 1)})
    out.producer_name = "edgeq-qcnn"
    onnx.checker.check_model(out)
    onnx.save(out, str(path))
    return Path(path).stat().st_size


def check_format(model) -> None:
    """Raise QcnnFormatError unless the model's `edgeq.qcnn.format` metadata (if any) is one this code reads."""
    version = {p.key: p.value for p in model.metadata_props}.get("edgeq.qcnn.format")
    if version is not None and version not in READ_VERSIONS:
        raise QcnnFormatError(f"Q-CNN format {version!r} is newer than this edgeq reads ({', '.join(READ_VERSIONS)})")


def read_pq(node, inits: dict) -> tuple[PQWeights, dict]:
    """PQWeights and int attributes of a PQConv/PQGemm node; inits: name -> numpy array."""
    from onnx import helper

    a = {x.name: int(helper.get_attribute_value(x)) for x in node.attribute}
    need = COMMON_ATTRS + (CONV_ATTRS if node.op_type == "PQConv" else GEMM_ATTRS)
    missing = [k for k in need if k not in a]
    if missing:
        raise QcnnFormatError(f"node {node.name!r} ({node.op_type}) lacks attributes {missing}")
    codebook = inits[node.input[1]].astype(np.float32)
    if codebook.shape != (a["M"], a["K"], a["dsub"]):
        raise QcnnFormatError(f"node {node.name!r}: codebook shape {codebook.shape}, attributes say "
                              f"[M, K, dsub] = [{a['M']}, {a['K']}, {a['dsub']}]")
    if node.op_type == "PQConv":
        S, group, C_out = a["kernel_h"] * a["kernel_w"], a["group"], a["out_channels"]
    else:
        S, group, C_out = 1, 1, a["out_features"]
    Mg = a["M"] // group
    if S * Mg * C_out != a["num_codes"]:
        raise QcnnFormatError(f"node {node.name!r}: num_codes={a['num_codes']}, expected S*M_g*C_out = "
                              f"{S}*{Mg}*{C_out}")
    layout = a.get("codes_layout", 0)
    if layout not in CODES_LAYOUTS.values():
        raise QcnnFormatError(f"node {node.name!r}: unknown codes_layout={layout}; known {CODES_LAYOUTS}")
    try:
        if layout == CODES_LAYOUTS["fastscan4"]:
            codes = unpack_fastscan4(inits[node.input[2]], S, Mg, C_out, group)
        else:
            codes = unpack_codes(inits[node.input[2]], a["num_codes"], a["nbits"]).reshape(S, Mg, C_out)
    except ValueError as err:
        raise QcnnFormatError(f"node {node.name!r}: {err}") from err
    return PQWeights(codebook, codes, inits[node.input[3]].astype(np.float32), group), a


def _std_nodes(node, pq: PQWeights, a: dict, store: np.dtype):
    """Standard ops computing the same as a PQ node: Gather codewords into weights, then Conv/Gemm."""
    from onnx import TensorProto, helper, numpy_helper

    n = node.name
    rows = pq.global_subspace()[None] * pq.K + pq.codes  # [S, M_g, C_out] rows of codebook [M*K, dsub]
    rows = rows.transpose(2, 1, 0)  # [C_out, M_g, S]
    itype = np.uint8 if pq.M * pq.K <= 256 else np.uint16 if pq.M * pq.K <= 65536 else np.int32
    inits = [numpy_helper.from_array(pq.codebook.reshape(-1, pq.dsub).astype(store), f"{n}.cb16"),
             numpy_helper.from_array(np.ascontiguousarray(rows, itype), f"{n}.rows"),
             numpy_helper.from_array(pq.bias.astype(store), f"{n}.b16")]
    C_out, Cg = pq.C_out, pq.Mg * pq.dsub
    if node.op_type == "PQConv":
        shape = [C_out, Cg, a["kernel_h"], a["kernel_w"]]
    else:
        shape = [C_out, Cg]
    inits.append(numpy_helper.from_array(np.array(shape, np.int64), f"{n}.wshape"))
    F = TensorProto.FLOAT
    nodes = [helper.make_node("Cast", [f"{n}.cb16"], [f"{n}.cb"], to=F),
             helper.make_node("Cast", [f"{n}.rows"], [f"{n}.idx"], to=TensorProto.INT64),
             helper.make_node("Cast", [f"{n}.b16"], [f"{n}.b"], to=F),
             helper.make_node("Gather", [f"{n}.cb", f"{n}.idx"], [f"{n}.sub"], axis=0),  # [C_out, M_g, S, dsub]
             helper.make_node("Transpose", [f"{n}.sub"], [f"{n}.subt"], perm=[0, 1, 3, 2]),  # [C_out, M_g, dsub, S]
             helper.make_node("Reshape", [f"{n}.subt", f"{n}.wshape"], [f"{n}.w"])]
    ins = [node.input[0], f"{n}.w", f"{n}.b"]
    if node.op_type == "PQConv":
        nodes.append(helper.make_node(
            "Conv", ins, list(node.output), name=n, kernel_shape=[a["kernel_h"], a["kernel_w"]],
            strides=[a["stride_h"], a["stride_w"]], pads=[a["pad_top"], a["pad_left"], a["pad_bottom"], a["pad_right"]],
            dilations=[a["dilation_h"], a["dilation_w"]], group=a["group"]))
    else:
        nodes.append(helper.make_node("Gemm", ins, list(node.output), name=n, transB=1))
    return nodes, inits


def export_standard(qcnn_path, out_path) -> int:
    """Write an equivalent model of standard ONNX ops only (no custom ops); returns its size in bytes.

    Codes are unpacked at export time into codebook row indices (smallest unsigned int type,
    Cast to int64 in the graph); weights are gathered from the float16/float32 codebook at run
    time and fed to standard Conv/Gemm.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qcnn_path))
    check_format(model)
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    nodes, new_inits, drop = [], [], set()
    for node in g.node:
        if node.domain == DOMAIN and node.op_type in PQ_OPS:
            pq, a = read_pq(node, inits)
            nds, its = _std_nodes(node, pq, a, inits[node.input[1]].dtype)
            nodes.extend(nds)
            new_inits.extend(its)
            drop.update(node.input[1:])
        else:
            nodes.append(node)
    keep = [t for t in g.initializer if t.name not in drop]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    kept_ops = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept_ops)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return Path(out_path).stat().st_size


def runtime_model(qcnn_path, ext_domain: str, kernels: int = 0):
    """The Q-CNN model as onnxruntime-extensions Python ops can run it (in memory; the file is untouched).

    PQ nodes move to `ext_domain` (Python custom ops live in onnxruntime-extensions' own domain)
    and their float16 codebook/bias initializers become float32 (the Python op API has no float16).
    Every PQ node gets explicit `codes_layout` (0 when absent) and `kernels` attributes: Python ops
    see only declared attributes, and `kernels` carries the runtime's choice to ops.py.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(qcnn_path))
    check_format(model)
    g = model.graph
    pq_inputs = set()
    for node in g.node:
        if node.domain == DOMAIN:
            if node.op_type not in PQ_OPS:
                raise QcnnFormatError(f"node {node.name!r}: unknown {DOMAIN} op {node.op_type!r}; known {PQ_OPS}")
            node.domain = ext_domain
            if not any(a.name == "codes_layout" for a in node.attribute):
                node.attribute.append(helper.make_attribute("codes_layout", 0))
            node.attribute.append(helper.make_attribute("kernels", kernels))
            pq_inputs.update((node.input[1], node.input[3]))
    for i, t in enumerate(g.initializer):
        if t.name in pq_inputs and t.data_type != onnx.TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    ops = [o for o in model.opset_import if o.domain not in (DOMAIN, ext_domain)]
    ops.append(helper.make_opsetid(ext_domain, 1))
    del model.opset_import[:]
    model.opset_import.extend(ops)
    return model
