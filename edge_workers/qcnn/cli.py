"""`edgeq compress`: options and handler (heavy imports happen only when the command runs)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

from publishers.errors import ConfigError


def add_compress_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `edgeq compress IN.onnx OUT.onnx`; defaults come from CompressConfig."""
    p.add_argument("input", metavar="IN.onnx", help="float ONNX model (Conv, Gemm/MatMul(+Add), Relu, MaxPool, ...)")
    p.add_argument("output", metavar="OUT.onnx", help="Q-CNN model to write")
    p.add_argument("--calib", metavar="DATA",
                   help="calibration data: MNIST directory (train split is used) or .npy (default data/mnist)")
    p.add_argument("--calib-images", type=int, help="number of calibration images (default 1000)")
    p.add_argument("--conv-dsub", type=int, help="conv sub-vector length along input channels (default 4)")
    p.add_argument("--conv-k", type=int, help="conv codewords per subspace (default 16)")
    p.add_argument("--fc-dsub", type=int, help="FC sub-vector length (default 8)")
    p.add_argument("--fc-k", type=int, help="FC codewords per subspace (default 8)")
    p.add_argument("--last-fc", choices=("float16", "float32", "pq"), help="classifier layer storage (default float16)")
    p.add_argument("--no-error-correction", action="store_true", help="plain k-means codebooks, no error correction")
    p.add_argument("--ec-iters", type=int, help="error-correction sweeps per layer (default 8)")
    p.add_argument("--codes-layout", choices=("auto", "bitstream", "fastscan4"),
                   help="PQ code storage: fastscan4 = the native kernel's 4-bit blocks (K <= 16), bitstream = "
                        "ceil(log2 K) bits per code; auto (default) = fastscan4 where codes take 4 bits")
    p.add_argument("--codebook-dtype", choices=("float16", "float32"), help="codebook storage (default float16)")
    p.add_argument("--seed", type=int, help="k-means and calibration sampling seed (default 0)")
    p.add_argument("--threads", type=int, help="threads for onnxruntime / BLAS while compressing (default 1)")
    p.add_argument("--export-standard", metavar="FILE", help="also write an equivalent standard-ONNX-ops model")
    p.add_argument("--manifest-key", metavar="KEY", help="evaluate on the test split and record the model under "
                                                         "models.KEY in manifest.json next to OUT")
    p.add_argument("--data-dir", help="MNIST directory for --manifest-key evaluation (default data/mnist)")


def run_compress(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    """Handler of `edgeq compress`; prints the report to stdout, progress lines via `progress`."""
    from edge_workers.qcnn.compress import CompressConfig, compress_model
    from edge_workers.qcnn.evaluate import load_calibration, manifest_entry
    from edge_workers.qcnn.export import export_standard
    from modelstore.manifest import update_manifest
    from publishers.sources import default_data_dir

    if not Path(args.input).is_file():
        raise ConfigError(f"input model not found: {args.input}")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(CompressConfig)
             if getattr(args, f.name, None) is not None}
    try:
        cfg = CompressConfig(**given, error_correction=not args.no_error_correction)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    data_dir = args.data_dir or str(default_data_dir())
    calib = load_calibration(args.calib or data_dir, cfg.calib_images, cfg.seed)
    progress(f"[compress] {args.input}: {len(calib)} calibration images from {args.calib or data_dir}")
    report = compress_model(args.input, args.output, calib, cfg, progress=progress)
    print(report.summary())
    if args.export_standard:
        size = export_standard(args.output, args.export_standard)
        print(f"standard-ops export: {args.export_standard} ({size} B)")
    if args.manifest_key:
        entry = manifest_entry(report, data_dir, args.export_standard, threads=cfg.threads)
        path = update_manifest(Path(args.output).parent, {args.manifest_key: entry})
        acc = entry["test_accuracy"]
        print(f"{args.manifest_key}: test accuracy {100 * acc['clean']:.2f} % clean, "
              f"{100 * acc['gaussian_0.2']:.2f} % gaussian 0.2 -> {path}")
    return 0
