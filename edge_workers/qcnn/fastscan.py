"""Native fast-scan Q-CNN kernels: the ``_fastscan`` C extension's loader, its 4-bit code layout, prepared layers.

The C kernels (``native/fastscan.c``) run PQ layers with K <= 16 codewords the way
FAISS fast-scan, Bolt and MADDNESS do: 4-bit codes, lookup tables quantized to
uint8, SIMD byte shuffles as 32/64/128 table lookups per instruction, 16-bit
accumulators flushed into 32-bit sums. One scan serves FC layers and convolutions
(the taps' tables of one output position are gathered into one table set).

Code layout ``fastscan4`` (what the kernel reads; ``edgeq compress`` stores it, see
docs/qcnn-format.md): uint8 [group, ceil(C_out/group / 32), Mp, 16]; block b, subspace
q = s * M_g + j (padded with code 0 to Mp, a multiple of 4), byte i = code of output
b*32 + i (low nibble) | code of output b*32 + 16 + i (high nibble) << 4.

Quantized tables cost accuracy: per sample one scale (largest table-row range / 255)
and one offset per row, so every looked-up entry is off by at most scale / 2 and an
output by at most (summed rows) * scale / 2 (``error_bound``).

When the extension is not built (no C compiler at install time) ``native()`` returns
None and logs one warning line; callers then use the numba kernels (``kernels.py``).
"""

from __future__ import annotations

import importlib
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edge_workers.qcnn import kernels
from edge_workers.qcnn.pq import FASTSCAN_BLOCK as BLOCK  # noqa: F401 (re-exported: the kernel's code layout)
from edge_workers.qcnn.pq import FASTSCAN_MAX_K as MAX_K
from edge_workers.qcnn.pq import (  # noqa: F401 (re-exported: the kernel's code layout)
    fastscan4_bytes,
    pack_fastscan4,
    padded_subspaces,
    unpack_fastscan4,
)
from publishers.errors import EdgeqError

logger = logging.getLogger(__name__)

EXTENSION = "edge_workers.qcnn._fastscan"
KERNELS = ("auto", "native", "numba")  # QcnnRuntime(kernels=...): auto = native where it applies

_loaded: dict = {}  # "module": the extension or None, "reason": why it is missing
_pools: dict[int, ThreadPoolExecutor] = {}  # threads -> pool splitting a batch (the kernels release the GIL)


class NativeUnavailableError(EdgeqError, RuntimeError):
    """kernels="native" was asked for but the extension is missing or the layer has K > 16."""


def native():
    """The ``_fastscan`` extension module, or None (then one warning line is logged, once per process)."""
    if "module" not in _loaded:
        try:
            _loaded["module"], _loaded["reason"] = importlib.import_module(EXTENSION), None
        except ImportError as err:
            _loaded["module"] = None
            _loaded["reason"] = (f"{EXTENSION} is not built ({err}); install edgeq with a C compiler "
                                 "(gcc or clang) present to get it")
            logger.warning("Q-CNN native kernels unavailable: %s; using the numba reference kernels",
                           _loaded["reason"])
    return _loaded["module"]


def missing_reason() -> str | None:
    """Why the extension could not be loaded, or None when it is."""
    native()
    return _loaded["reason"]


def paths() -> list[str]:
    """SIMD paths this CPU can run, best first ("avx512bw", "avx2", "neon", "scalar"); [] without the extension."""
    mod = native()
    return list(mod.paths()) if mod else []


def codebook_t(codebook: np.ndarray) -> np.ndarray:
    """codebook float32 [M, K, dsub] (K <= 16) -> float32 [M, dsub, 16] (kernel layout).

    Codewords K..15 repeat codeword 0: no code names them, and their table entries then leave each
    row's minimum and range (the quantization) unchanged.
    """
    M, K, dsub = codebook.shape
    if K > MAX_K:
        raise ValueError(f"fast-scan kernels take K <= {MAX_K} codewords, got K={K}")
    padded = np.concatenate([codebook, np.repeat(codebook[:, :1], MAX_K - K, axis=1)], axis=1)
    return np.ascontiguousarray(padded.transpose(0, 2, 1), dtype=np.float32)


def error_bound(lut: np.ndarray, rows_per_output: int) -> float:
    """Largest |native - float-table| output difference from table quantization, for lut float32 [..., 16]
    of one sample (K = 16): rows_per_output * scale / 2, scale = largest row range / 255."""
    rng = (lut.max(axis=-1) - lut.min(axis=-1)).max()
    return float(rows_per_output * rng / 255 / 2)


def _split(run, x: np.ndarray, y: np.ndarray, threads: int) -> None:
    """run(x_part, y_part) over `threads` contiguous slices of the batch, the first on the calling thread."""
    parts = min(threads, len(x))
    if parts < 2:
        run(x, y)
        return
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="edgeq-fastscan")
    bounds = [len(x) * i // parts for i in range(parts + 1)]
    futures = [pool.submit(run, x[a:b], y[a:b]) for a, b in zip(bounds[1:-1], bounds[2:], strict=False)]
    run(x[:bounds[1]], y[:bounds[1]])
    for f in futures:
        f.result()


def _module_or_raise():
    mod = native()
    if mod is None:
        raise NativeUnavailableError(missing_reason())
    return mod


class FastScanGemm:
    """A PQ FC layer for the C kernel: codebook float32 [M, K<=16, dsub], codes int [1, M, C_t], bias [C_t].

    packed: the fastscan4 codes if already laid out (as read from a file), else they are packed here.
    path: SIMD path name, "" for the best this CPU runs. threads: a batch is split over this many threads.
    """

    def __init__(self, codebook, codes, bias, path: str = "", packed: np.ndarray | None = None, threads: int = 1):
        self._mod, self.threads = _module_or_raise(), max(1, int(threads))
        codebook, codes, self.bias = kernels._check_params(codebook, codes, bias)
        self.M, self.K, self.dsub = codebook.shape
        if codes.shape[:2] != (1, self.M):
            raise ValueError(f"expected codes [1, {self.M}, C_t], got {codes.shape}")
        self.C_out, self.Mp, self.path = codes.shape[2], padded_subspaces(self.M), path
        self.cbt = codebook_t(codebook)
        self.packed = pack_fastscan4(codes) if packed is None else np.ascontiguousarray(packed, np.uint8).reshape(-1)

    def apply(self, x, lut: np.ndarray | None = None, scales: np.ndarray | None = None) -> np.ndarray:
        """x: float32 [N, M*dsub] -> float32 [N, C_t]; lut [N, M, 16] / scales [N, 2] receive the tables if given."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.M * self.dsub:
            raise ValueError(f"expected x [N, {self.M * self.dsub}], got {x.shape}")
        y = np.empty((x.shape[0], self.C_out), np.float32)
        if lut is not None or scales is not None:
            self._run(x, y, lut, scales)
        else:
            _split(self._run, x, y, self.threads)
        return y

    def _run(self, x, y, lut=None, scales=None) -> None:
        self._mod.fc(x, self.cbt, self.packed, self.bias, y, x.shape[0], self.M, self.Mp, self.K, self.dsub,
                     self.C_out, self.path, lut, scales)


class FastScanConv(kernels.PQConv):
    """A PQ convolution for the C kernel (same arguments as kernels.PQConv, K <= 16; pads top, left, bottom, right)."""

    def __init__(self, codebook, codes, bias, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1,
                 path: str = "", packed: np.ndarray | None = None, threads: int = 1):
        self._mod, self.threads = _module_or_raise(), max(1, int(threads))
        super().__init__(codebook, codes, bias, kernel, strides, pads, dilations, group)
        codes = np.asarray(codes)
        self.M, self.K, self.dsub = self.codebook.shape
        S, self.Mg, self.C_out = codes.shape
        self.Mp, self.path = padded_subspaces(S * self.Mg), path
        self.cbt = codebook_t(self.codebook)
        self.packed = (pack_fastscan4(codes, self.group) if packed is None
                       else np.ascontiguousarray(packed, np.uint8).reshape(-1))
        del self.codes_o  # the numba layout is not used here

    def apply(self, x) -> np.ndarray:
        """x: float32 [N, C_in, H, W] -> float32 [N, C_out, OH, OW]."""
        x, OH, OW = self.check_input(x)
        N, C, H, W = x.shape
        y = np.empty((N, self.C_out, OH, OW), np.float32)
        geometry = (C, H, W, self.M, self.K, self.dsub, self.Mg, self.Mp, self.C_out, self.group, *self.kernel,
                    *self.strides, *self.pads, *self.dilations, OH, OW)
        if self.threads == 1 or N == 1:
            self._mod.conv(x, self.cbt, self.packed, self.bias, y, (N, *geometry), self.path)
            return y

        def run(xs, ys):
            self._mod.conv(xs, self.cbt, self.packed, self.bias, ys, (len(xs), *geometry), self.path)

        _split(run, x, y, self.threads)
        return y


def from_attrs(op_type: str, codebook, codes, bias, a: dict, kernels_choice: str = "auto", packed=None,
               threads: int = 1):
    """The layer object running an ``ai.edgeq`` node: native when `kernels_choice` and K allow, else numba.

    codes int [S, M_g, C_out]; packed: its fastscan4 bytes when the file stores that layout; threads:
    native layers split a batch over this many threads (numba layers follow numba's thread setting).
    """
    if kernels_choice not in KERNELS:
        raise ValueError(f"unknown Q-CNN kernels {kernels_choice!r}; known {KERNELS}")
    K = np.asarray(codebook).shape[1]
    if kernels_choice == "native" and K > MAX_K:
        raise NativeUnavailableError(f"native kernels take K <= {MAX_K}, this layer has K={K}")
    if kernels_choice == "numba" or K > MAX_K or native() is None:
        if kernels_choice == "native":
            raise NativeUnavailableError(missing_reason())
        return kernels.from_attrs(op_type, codebook, codes, bias, a)
    if op_type == "PQGemm":
        return FastScanGemm(codebook, codes, bias, packed=packed, threads=threads)
    return FastScanConv(codebook, codes, bias, (a["kernel_h"], a["kernel_w"]), (a["stride_h"], a["stride_w"]),
                        (a["pad_top"], a["pad_left"], a["pad_bottom"], a["pad_right"]),
                        (a["dilation_h"], a["dilation_w"]), a["group"], packed=packed, threads=threads)
