"""The ``qcnn`` model runtime: a Q-CNN ONNX file in onnxruntime with the PQ custom ops (numba kernels)."""

from __future__ import annotations

import numpy as np

from edge_workers.runtime import register


@register("qcnn")
class QcnnRuntime:
    """Runs a Q-CNN file (ai.edgeq PQConv/PQGemm nodes) through onnxruntime + onnxruntime-extensions.

    threads: onnxruntime intra-op threads and numba threads for the PQ kernels.
    """

    key = "qcnn"

    def __init__(self, path: str, threads: int = 1):
        import numba
        import onnxruntime as ort

        from edge_workers.qcnn.export import runtime_model
        from edge_workers.qcnn.ops import EXT_DOMAIN, session_options

        self.path = path
        self.threads = max(1, int(threads))
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        try:
            model = runtime_model(path, EXT_DOMAIN)
            self.session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(self.threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # onnx / onnxruntime raise their own exception types
            raise ValueError(f"cannot load Q-CNN model {path}: {err}") from err
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        dims = list(inp.shape[1:])
        if not all(isinstance(d, int) for d in dims):
            raise ValueError(f"{path}: input {inp.name} needs static per-sample dims, got {inp.shape}")
        self.input_shape = tuple(dims)

    def warmup(self) -> None:
        """Compile / load the numba kernels and let onnxruntime allocate, on one zero sample."""
        self.predict(np.zeros((1, *self.input_shape), dtype=np.float32))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """x: float32 [N, *input_shape] -> logits float32 [N, classes]."""
        import numba

        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"expected input [N, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}")
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        return self.session.run([self.output_name], {self.input_name: x})[0]
