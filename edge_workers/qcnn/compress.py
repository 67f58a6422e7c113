"""Whole-network Q-CNN compression: plan layers, k-means PQ, bottom-up error correction, write the file.

Layers are quantized bottom-up (Wu et al. 2016, sec. 3.3): each layer's
calibration inputs come from the network whose lower layers are already
quantized, while its targets are the ORIGINAL network's responses. The plain
k-means network (same codes size, no error correction) is evaluated on the
same calibration data so the report compares the two layer by layer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_workers.qcnn import ec
from edge_workers.qcnn.export import LAYOUT_CHOICES, codes_layout_for, write_qcnn
from edge_workers.qcnn.graph import (
    LinearLayer,
    activations,
    load_float_model,
    with_weights,
)
from edge_workers.qcnn.pq import PQWeights, fastscan4_bytes, nbits_for, train_kmeans, weight_taps

Progress = Callable[[str], None]
DTYPES = ("float16", "float32")
LAST_FC = ("float16", "float32", "pq")


@dataclass
class CompressConfig:
    """How to compress a float CNN into a Q-CNN.

    conv_dsub/conv_k, fc_dsub/fc_k: sub-vector length and codewords per subspace.
    last_fc: the classifier layer is kept standard in "float16"/"float32" storage or quantized ("pq").
    Layers where PQ cannot apply (dsub does not divide the input dims, e.g. a 1-channel first conv)
    or would not be smaller than float16 storage stay standard in `codebook_dtype`.
    calib_images: calibration images (unlabelled, train split) used when the caller loads them.
    conv_sample_rows: im2col rows (output positions) sampled per conv layer for the statistics.
    threads: BLAS / onnxruntime threads, and k-means fits run side by side (each single-threaded).
    codes_layout: how codes are stored: "fastscan4" (the native kernel's 4-bit blocks, K <= 16), "bitstream"
      (ceil(log2 K) bits per code), "auto" = fastscan4 where codes take exactly 4 bits (export.codes_layout_for).
    conv_k is 16 (not 32) so every default layer runs on the native fast-scan kernels (K <= 16); on the
      edge CNN the held-out accuracy of K=16 and K=32 differed by less than 0.1 point (docs/results/qcnn.md).
    kmeans_n_init, kmeans_max_iter: scikit-learn KMeans restarts (k-means++ init) and Lloyd iterations
      per subspace.
    wide_subspaces: layers with more PQ subspaces M than this are "wide" (a 4096 -> 4096 FC at
      fc_dsub=8 has M=512; the edge CNN's layers have M <= 64) and use the cheaper settings below,
      so compressing one costs about a minute on 2 cores instead of over ten:
    wide_kmeans_n_init, wide_kmeans_max_iter: KMeans restarts and iterations for wide layers (on a random
      4096-wide FC one k-means++ start ends within 1 % of the best-of-four distortion at a third of the cost);
    wide_ec_iters: error-correction sweeps for wide layers (each sweep costs a [D, D] x [D, C_out] product,
      ~3 s at 4096; on the random 4096-wide FC 2 sweeps give 95 % of the calibration-error drop of 4).
    """

    conv_dsub: int = 4
    conv_k: int = 16
    fc_dsub: int = 8
    fc_k: int = 8
    last_fc: str = "float16"
    error_correction: bool = True
    ec_iters: int = 8
    calib_images: int = 1000
    codebook_dtype: str = "float16"
    seed: int = 0
    conv_sample_rows: int = 32768
    threads: int = 1
    kmeans_n_init: int = 4
    kmeans_max_iter: int = 300
    wide_subspaces: int = 256
    wide_kmeans_n_init: int = 1
    wide_kmeans_max_iter: int = 50
    wide_ec_iters: int = 2
    codes_layout: str = "auto"

    def __post_init__(self) -> None:
        for name in ("conv_dsub", "conv_k", "fc_dsub", "fc_k", "ec_iters", "calib_images", "conv_sample_rows",
                     "threads", "kmeans_n_init", "kmeans_max_iter", "wide_subspaces", "wide_kmeans_n_init",
                     "wide_kmeans_max_iter", "wide_ec_iters"):
            if int(getattr(self, name)) < (2 if name.endswith("_k") else 1):
                raise ValueError(f"{name} must be >= {2 if name.endswith('_k') else 1}, got {getattr(self, name)!r}")
        if self.codebook_dtype not in DTYPES:
            raise ValueError(f"codebook_dtype must be one of {DTYPES}, got {self.codebook_dtype!r}")
        if self.codes_layout not in LAYOUT_CHOICES:
            raise ValueError(f"codes_layout must be one of {LAYOUT_CHOICES}, got {self.codes_layout!r}")
        if self.last_fc not in LAST_FC:
            raise ValueError(f"last_fc must be one of {LAST_FC}, got {self.last_fc!r}")


@dataclass
class CompressReport:
    """What compress_model did. layers: one dict per linear layer (see compress_model)."""

    in_path: str
    out_path: str
    in_bytes: int
    file_bytes: int
    layers: list[dict]
    config: dict
    calib_images: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Float file size / Q-CNN file size."""
        return self.in_bytes / self.file_bytes

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": self.ratio}

    def summary(self) -> str:
        head = (f"{self.out_path}: {self.file_bytes} B ({self.ratio:.1f}x smaller than {self.in_bytes} B), "
                f"{self.calib_images} calibration images, {self.seconds:.1f} s")
        lines = [head]
        for ly in self.layers:
            if ly["kind_stored"] == "pq":
                ec_part = f", EC {ly['response_error_ec']:.4f}" if ly["response_error_ec"] is not None else ""
                lines.append(f"  {ly['name']} ({ly['kind']}): PQ M={ly['M']} K={ly['K']} dsub={ly['dsub']}, "
                             f"{ly['float_bytes']} -> {ly['pq_bytes']} B, response error k-means "
                             f"{ly['response_error_kmeans']:.4f}{ec_part}")
            else:
                lines.append(f"  {ly['name']} ({ly['kind']}): kept standard ({ly['kind_stored']}), "
                             f"{ly['float_bytes']} -> {ly['pq_bytes']} B")
        return "\n".join(lines)


def plan_layers(layers: list[LinearLayer], cfg: CompressConfig) -> dict[str, tuple | str]:
    """layer name -> (dsub, K) to quantize, or a float dtype to keep it standard."""
    fcs = [ly.name for ly in layers if ly.kind == "fc"]
    itemsize = np.dtype(cfg.codebook_dtype).itemsize
    plan: dict[str, tuple | str] = {}
    for ly in layers:
        dsub, K = (cfg.conv_dsub, cfg.conv_k) if ly.kind == "conv" else (cfg.fc_dsub, cfg.fc_k)
        if fcs and ly.name == fcs[-1] and cfg.last_fc != "pq":
            plan[ly.name] = cfg.last_fc
            continue
        C_out, Cg, S = weight_taps(ly.weight).shape
        if Cg % dsub or (C_out // ly.group) * S < K:
            plan[ly.name] = cfg.codebook_dtype
            continue
        pq_size = (ly.group * Cg * K + C_out) * itemsize + (S * (Cg // dsub) * C_out * nbits_for(K) + 7) // 8
        plan[ly.name] = (dsub, K) if pq_size < ly.float_params * 2 else cfg.codebook_dtype
    return plan


def _stats(layer: LinearLayer, x: np.ndarray, y: np.ndarray, cfg: CompressConfig) -> ec.ResponseStats:
    """Statistics from a layer's calibration input x and original response y (float32 arrays)."""
    if layer.kind == "fc":
        return ec.stats_from_rows(x.reshape(len(x), 1, -1), y.reshape(len(y), -1), 1)
    rng = np.random.default_rng(cfg.seed)
    rows = ec.sample_rows(len(y), y.shape[2], y.shape[3], cfg.conv_sample_rows, rng)
    X = ec.im2col_rows(x, layer.kernel, layer.strides, layer.pads, layer.dilations, rows)
    Y = y[rows[:, 0], :, rows[:, 1], rows[:, 2]]
    return ec.stats_from_rows(X, Y, layer.group)


def _kept_weights(layer: LinearLayer, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    return layer.weight.astype(dtype).astype(np.float32), layer.bias.astype(dtype).astype(np.float32)


def _decoded(layer: LinearLayer, pq: PQWeights) -> tuple[np.ndarray, np.ndarray]:
    return pq.decode().reshape(layer.weight.shape), pq.bias


def compress_model(in_path, out_path, calib: np.ndarray, cfg: CompressConfig | None = None,
                   progress: Progress | None = None) -> CompressReport:
    """Compress the float ONNX model at `in_path` into a Q-CNN file at `out_path`.

    calib: float32 [N, *input_shape] calibration inputs (unlabelled training images).
    Per-layer report dicts: name, kind ("conv"|"fc"), kind_stored ("pq"|"float16"|"float32"), M, K, dsub,
    float_bytes (float32 storage), pq_bytes (as stored), response_error_kmeans, response_error_ec
    (relative ||Y_q - Y||^2 / ||Y||^2 on the calibration inputs, each network fed its own quantized
    lower layers; None for standard layers / without EC), seconds.
    """
    from threadpoolctl import threadpool_limits

    cfg = cfg or CompressConfig()
    progress = progress or (lambda _m: None)
    t_start = time.perf_counter()
    calib = np.ascontiguousarray(calib, dtype=np.float32)
    model, layers = load_float_model(in_path)
    plan = plan_layers(layers, cfg)
    quant = [ly for ly in layers if isinstance(plan[ly.name], tuple)]
    with threadpool_limits(cfg.threads):
        kmeans = {ly.name: _train_kmeans(ly, plan[ly.name], cfg) for ly in quant}
        base = {ly.name: _kept_weights(ly, plan[ly.name]) for ly in layers if ly.name not in kmeans}
        names = [n for ly in quant for n in (ly.input, ly.output)]
        orig = activations(model, calib, names, threads=cfg.threads)
        km_model = with_weights(model, layers, {**base, **{ly.name: _decoded(ly, kmeans[ly.name]) for ly in quant}})
        km_in = activations(km_model, calib, [ly.input for ly in quant], threads=cfg.threads)
        final: dict = {ly.name: plan[ly.name] for ly in layers if ly.name not in kmeans}
        current = dict(base)
        rows = []
        for ly in layers:
            t0 = time.perf_counter()
            row = _row(ly, plan[ly.name], cfg)
            if ly.name in kmeans:
                km = kmeans[ly.name]
                km_stats = _stats(ly, km_in[ly.input], orig[ly.output], cfg)
                row["response_error_kmeans"] = ec.response_error(km_stats, km.decode(), km.bias)
                final[ly.name] = km
                if cfg.error_correction:
                    x = activations(with_weights(model, layers, current), calib, [ly.input], threads=cfg.threads)
                    same = np.array_equal(x[ly.input], km_in[ly.input])  # no quantized layer below yet
                    stats = km_stats if same else _stats(ly, x[ly.input], orig[ly.output], cfg)
                    before = row["response_error_kmeans"] if same else ec.response_error(stats, km.decode(), km.bias)
                    iters = cfg.wide_ec_iters if _is_wide(ly, plan[ly.name], cfg) else cfg.ec_iters
                    fixed = ec.error_correct(stats, km, iters).rounded(cfg.codebook_dtype)
                    row["response_error_ec_init"] = before
                    row["response_error_ec"] = ec.response_error(stats, fixed.decode(), fixed.bias)
                    final[ly.name] = fixed
                current[ly.name] = _decoded(ly, final[ly.name])
                row["pq_bytes"] = _stored_bytes(final[ly.name], cfg)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            rows.append(row)
            progress(_progress_line(row))
    file_bytes = write_qcnn(model, layers, final, cfg.codebook_dtype, out_path, cfg.codes_layout)
    return CompressReport(str(in_path), str(out_path), Path(in_path).stat().st_size, file_bytes, rows,
                          dataclasses.asdict(cfg), len(calib), round(time.perf_counter() - t_start, 2))


def _stored_bytes(pq: PQWeights, cfg: CompressConfig) -> int:
    """Bytes of a PQ layer as written: codebook and bias in cfg.codebook_dtype, codes in their layout."""
    itemsize = np.dtype(cfg.codebook_dtype).itemsize
    if codes_layout_for(pq, cfg.codes_layout):
        return (pq.codebook.size + pq.bias.size) * itemsize + fastscan4_bytes(pq.S, pq.Mg, pq.C_out, pq.group)
    return pq.nbytes(itemsize)


def _is_wide(ly: LinearLayer, choice: tuple, cfg: CompressConfig) -> bool:
    """True for a layer with more than cfg.wide_subspaces PQ subspaces (M = group * C_in/group / dsub)."""
    return ly.group * ly.in_dims // choice[0] > cfg.wide_subspaces


def _train_kmeans(ly: LinearLayer, choice: tuple, cfg: CompressConfig) -> PQWeights:
    """k-means PQ of one layer (choice = (dsub, K)) with the normal or the wide-layer settings."""
    wide = _is_wide(ly, choice, cfg)
    pq = train_kmeans(ly.weight, ly.bias, *choice, group=ly.group, seed=cfg.seed,
                      n_init=cfg.wide_kmeans_n_init if wide else cfg.kmeans_n_init,
                      max_iter=cfg.wide_kmeans_max_iter if wide else cfg.kmeans_max_iter, threads=cfg.threads)
    return pq.rounded(cfg.codebook_dtype)


def _row(ly: LinearLayer, choice, cfg: CompressConfig) -> dict:
    pq = isinstance(choice, tuple)
    C_out, Cg, S = weight_taps(ly.weight).shape
    dsub, K = choice if pq else (None, None)
    return {"name": ly.name, "kind": ly.kind, "kind_stored": "pq" if pq else choice,
            "M": ly.group * Cg // dsub if pq else None, "K": K, "dsub": dsub,
            "float_bytes": 4 * ly.float_params,
            "pq_bytes": ly.float_params * np.dtype(choice if not pq else "float32").itemsize,
            "response_error_kmeans": None, "response_error_ec": None}


def _progress_line(row: dict) -> str:
    if row["kind_stored"] != "pq":
        return f"[compress] {row['name']}: kept standard ({row['kind_stored']}), {row['pq_bytes']} B"
    err = f"response error k-means {row['response_error_kmeans']:.4f}"
    if row["response_error_ec"] is not None:
        err += f", before EC {row['response_error_ec_init']:.4f} -> after EC {row['response_error_ec']:.4f}"
    return (f"[compress] {row['name']}: M={row['M']} K={row['K']} dsub={row['dsub']}, {row['pq_bytes']} B, "
            f"{err}, {row['seconds']:.2f} s")
