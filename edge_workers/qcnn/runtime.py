"""The ``qcnn`` model runtime: a Q-CNN ONNX file with its PQ layers run by the native or numba kernels.

Kernels (``kernels=``): "auto" (default) runs layers with K <= 16 codewords on the native
fast-scan kernels (``fastscan.py``: 8-bit tables, SIMD shuffles) and the others on the numba
kernels (``kernels.py``: float32 tables); "native" requires the fast-scan kernels for every
layer; "numba" is the float-table reference. Without the compiled extension "auto" logs one
warning and uses numba.

Three execution modes, same PQ kernels:

* ``mode="direct"`` (default): when every PQ layer is native and every other node is one the
  native net runs (``native_net.py``: Conv, Gemm, Relu, MaxPool, Flatten, Cast of weights), the
  whole graph is one native net, one C call per batch. Otherwise, as ``segments``.
* ``mode="segments"``: the graph is cut at its PQConv/PQGemm nodes. Each run of
  standard nodes between them becomes a small onnxruntime session (same threads), each PQ
  node a prepared layer (``fastscan.FastScanConv``/``FastScanGemm`` or ``kernels.PQConv``/``PQGemm``;
  codes unpacked and laid out once at load),
  and ``predict`` passes numpy arrays from one step to the next. The sessions cost 25-45 us
  each at batch 1 (edge CNN, 1 thread: 96 of 151 us), which is why the net exists.
* ``mode="extensions"``: one onnxruntime session with the PQ nodes as onnxruntime-extensions
  Python custom ops (``ops.py``). It needs no graph surgery but pays onnxruntime-extensions'
  per-call conversion: the op's output goes back to C++ as ``rv.flatten().tolist()`` (a
  Python float per element, ``onnxruntime_extensions/_ocos.py``), and attributes are re-cast
  into a new dict on every call.

Why direct/segments and not extensions (edge_cnn, 1 thread, numba kernels in both modes, medians on a
shared 2-core host, float onnxruntime in the same process for scale): batch 1 0.37 vs
1.10 ms (float 0.14), batch 32 5.0 vs 18.0 ms (float 2.5), batch 64 9.4 vs 39.0 ms (float
3.8). In extensions mode the PQ op bodies are ~20% of the time and the conversion the rest,
far outside the 1.5x that would justify the simpler single session.

Threads: sub-sessions get `threads` intra-op threads; the native net shares a batch with a C helper
thread that spins between calls (``native/net.h``), the native kernels of segments mode split a
batch over `threads` Python threads (the C code releases the GIL), numba kernels run their prange
versions over samples. Sub-sessions do not spin (their workers would take the cores the
kernels run on next), which costs wake-up time at batch 1; numba's OpenMP layer spins in its barriers by default,
which costs milliseconds per call when the cores are shared; set ``OMP_WAIT_POLICY=passive``
(or ``NUMBA_THREADING_LAYER=workqueue``) at process start where that is the case.
"""

from __future__ import annotations

import numpy as np

from edge_workers.runtime import check_batch, register, static_input_shape

MODES = ("direct", "segments", "extensions")


@register("qcnn")
class QcnnRuntime:
    """Runs a Q-CNN file (ai.edgeq PQConv/PQGemm nodes); see the module docstring for `mode`.

    threads: onnxruntime intra-op threads, numba threads for the numba kernels, and the number of
    slices a batch is split into for the native kernels. kernels: "auto", "native" or "numba".
    """

    key = "qcnn"

    def __init__(self, path: str, threads: int = 1, mode: str = "direct", kernels: str = "auto"):
        import numba

        from edge_workers.qcnn.fastscan import KERNELS, NativeUnavailableError

        if mode not in MODES:
            raise ValueError(f"unknown qcnn runtime mode {mode!r}; known {MODES}")
        if kernels not in KERNELS:
            raise ValueError(f"unknown qcnn kernels {kernels!r}; known {KERNELS}")
        self.path, self.mode, self.kernels = path, mode, kernels
        self.threads = max(1, int(threads))
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        try:
            if mode == "extensions":
                self._run, self.input_name, input_dims = _extensions(path, self.threads, kernels)
            else:
                self._run, self.input_name, input_dims = _direct(path, self.threads, kernels, mode == "direct")
        except NativeUnavailableError:
            raise
        except Exception as err:  # onnx / onnxruntime raise their own exception types
            raise ValueError(f"cannot load Q-CNN model {path}: {err}") from err
        self.input_shape = static_input_shape(path, self.input_name, input_dims)

    def warmup(self) -> None:
        """Compile / load the numba kernels and let onnxruntime allocate, on one zero sample."""
        self.predict(np.zeros((1, *self.input_shape), dtype=np.float32))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """x: float32 [N, *input_shape] -> logits float32 [N, classes]."""
        import numba

        x = check_batch(x, self.input_shape)
        if getattr(self._run, "uses_numba", True):  # costs microseconds: skipped when every PQ layer is native
            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        return self._run(x)


def _extensions(path: str, threads: int, kernels: str):
    """(run, input name, input dims): one session, PQ nodes as onnxruntime-extensions Python ops."""
    import onnxruntime as ort

    from edge_workers.qcnn import ops
    from edge_workers.qcnn.export import runtime_model

    model = runtime_model(path, ops.EXT_DOMAIN, ops.KERNELS.index(kernels))
    session = ort.InferenceSession(model.SerializeToString(), sess_options=ops.session_options(threads),
                                   providers=["CPUExecutionProvider"])
    inp, out = session.get_inputs()[0], session.get_outputs()[0].name
    return (lambda x: session.run([out], {inp.name: x})[0]), inp.name, inp.shape


def _direct(path: str, threads: int, kernels: str, native_net: bool = True):
    """(run, input name, input dims): the whole graph as one native net when `native_net` and every node allows
    (``native_net.py``), else standard-node segments as onnxruntime sessions and PQ nodes as kernel calls."""
    import onnx
    from onnx import numpy_helper

    from edge_workers.qcnn import fastscan
    from edge_workers.qcnn import native_net as netlib
    from edge_workers.qcnn.export import CODES_LAYOUTS, DOMAIN, PQ_OPS, QcnnFormatError, check_format, read_pq

    model = onnx.load(path)
    check_format(model)
    g = model.graph
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise QcnnFormatError(f"node {node.name!r} ({node.op_type}) has a subgraph; use mode='extensions'")
    inits = {t.name: t for t in g.initializer}
    init_names = set(inits)
    graph_inputs = [v for v in g.input if v.name not in init_names]
    if len(graph_inputs) != 1 or len(g.output) != 1:
        raise QcnnFormatError(f"expected one input and one output, got {[v.name for v in graph_inputs]} -> "
                              f"{[v.name for v in g.output]}")
    # Group nodes (already topologically sorted, as ONNX requires) into PQ nodes and runs of standard nodes.
    groups: list[list] = []
    for node in g.node:
        is_pq = node.domain == DOMAIN
        if is_pq and node.op_type not in PQ_OPS:
            raise QcnnFormatError(f"node {node.name!r}: unknown {DOMAIN} op {node.op_type!r}; known {PQ_OPS}")
        if is_pq or not groups or groups[-1][0].domain == DOMAIN:
            groups.append([node])
        else:
            groups[-1].append(node)
    needed_later = [set() for _ in groups]  # names read by groups after i, or the graph output
    later = {g.output[0].name}
    for i in range(len(groups) - 1, -1, -1):
        needed_later[i] = set(later)
        later |= {n for node in groups[i] for n in node.input if n}
    types = {graph_inputs[0].name: graph_inputs[0].type.tensor_type.elem_type}
    k_max = max((a.i for nd in g.node if nd.domain == DOMAIN for a in nd.attribute if a.name == "K"), default=0)
    uses_numba = kernels == "numba" or k_max > fastscan.MAX_K or fastscan.native() is None
    pq_layers = {}  # PQ node output -> prepared layer (codes unpacked and laid out once)
    for node in g.node:
        if node.domain == DOMAIN:
            arrays = {n: numpy_helper.to_array(inits[n]) for n in node.input[1:]}
            pq, a = read_pq(node, arrays)
            packed = arrays[node.input[2]] if a.get("codes_layout") == CODES_LAYOUTS["fastscan4"] else None
            pq_layers[node.output[0]] = fastscan.from_attrs(node.op_type, pq.codebook, pq.codes, pq.bias, a, kernels,
                                                            packed, threads)
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in graph_inputs[0].type.tensor_type.shape.dim]
    if native_net and not uses_numba and all(isinstance(d, int) for d in dims[1:]):
        net = netlib.build(model, pq_layers, dims[1:], threads)
        if net is not None:
            def run_net(x: np.ndarray) -> np.ndarray:
                return net.run(x)

            run_net.uses_numba, run_net.net = False, net
            return run_net, graph_inputs[0].name, dims
    steps = []
    for i, nodes in enumerate(groups):
        if nodes[0].domain == DOMAIN:
            node = nodes[0]
            steps.append((pq_layers[node.output[0]].apply, node.input[0], node.output[0]))
            types[node.output[0]] = onnx.TensorProto.FLOAT
        else:
            session, ins, outs = _segment(model, nodes, inits, types, needed_later[i], threads, f"{path}#{i}")
            steps.append((session.run, ins, outs))
    out_name, in_name = g.output[0].name, graph_inputs[0].name

    def run(x: np.ndarray) -> np.ndarray:
        env = {in_name: x}
        for fn, ins, outs in steps:
            if isinstance(outs, str):
                env[outs] = fn(env[ins])
            else:
                env.update(zip(outs, fn(outs, {n: env[n] for n in ins}), strict=True))
        return env[out_name]

    run.uses_numba = uses_numba
    return run, in_name, dims


def _segment(model, nodes: list, inits: dict, types: dict, needed: set, threads: int, name: str):
    """(session, input names, output names) running `nodes` alone; `types` gains the outputs' element types."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from edge_workers.qcnn.export import DOMAIN
    from edge_workers.runtime import session_options

    produced = {n for node in nodes for n in node.output if n}
    read = [n for node in nodes for n in node.input if n]
    ins = list(dict.fromkeys(n for n in read if n not in produced and n not in inits))
    outs = [n for node in nodes for n in node.output if n in needed]
    sub = helper.make_graph(nodes, name, [helper.make_tensor_value_info(n, types[n], None) for n in ins],
                            [onnx.ValueInfoProto(name=n) for n in outs],  # output types: onnxruntime infers them
                            [inits[n] for n in dict.fromkeys(read) if n in inits])
    m = helper.make_model(sub, opset_imports=[o for o in model.opset_import if o.domain != DOMAIN],
                          ir_version=model.ir_version)
    so = session_options(threads)
    # Spinning onnxruntime workers would take the cores the kernels run on next (numba's OpenMP threads, or the
    # native kernels' batch halves: with spinning, edge CNN batch 32 on 2 threads measured 2.8-5.2 ms vs 1.5 ms).
    if threads > 1:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(m.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    for o in session.get_outputs():  # "tensor(float)" -> TensorProto.FLOAT
        types[o.name] = onnx.TensorProto.DataType.Value(o.type[len("tensor("):-1].upper())
    return session, ins, outs
