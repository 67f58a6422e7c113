"""`edgeq partition MODEL.onnx`: cut a model at every legal point, write the head/tail pairs and the manifest,
print a table."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def add_arguments(p: argparse.ArgumentParser) -> None:
    from modelstore.partition_files import DEFAULT_CODECS

    p.add_argument("part_model", metavar="MODEL.onnx", help="float or Q-CNN ONNX model (a chain of layers)")
    p.add_argument("--out-dir", dest="part_out_dir", metavar="DIR",
                   help="where to write the pairs and <model>.partition.json (default: partitions/<model> next to "
                        "the model)")
    p.add_argument("--cut", dest="part_cut", default="all", metavar="NAME|all",
                   help="cut point(s), comma-separated: a point (pool1) or an id (edge_cnn@pool1); default all")
    p.add_argument("--codecs", dest="part_codecs", type=_names, default=DEFAULT_CODECS, metavar="CODECS",
                   help=f"tensor codecs to account for (default {','.join(DEFAULT_CODECS)}; also pq8 with --pq)")
    p.add_argument("--profile", dest="part_profile", action="store_true",
                   help="measure every head, tail and segment at each --batches on each --runtimes")
    p.add_argument("--batches", dest="part_batches", type=_ints, default=(1, 32), metavar="B,...",
                   help="batch sizes to profile (default 1,32)")
    p.add_argument("--runtimes", dest="part_runtimes", type=_names, metavar="KEYS",
                   help="runtimes to profile on (default: the model's own, qcnn for Q-CNN files, else onnx)")
    p.add_argument("--accuracy", dest="part_accuracy", action="store_true",
                   help="accuracy of tail(codec(head(x))) per cut and codec on the validation slice of train and "
                        "the held-out test split")
    p.add_argument("--pq", dest="part_pq", action="store_true",
                   help="also train pq8 codebooks (k-means per sub-vector of --pq-dsub channels) on the train split")
    p.add_argument("--pq-dsub", dest="part_pq_dsub", type=int, default=4, metavar="D",
                   help="channels per pq8 sub-vector (default 4)")
    p.add_argument("--pq-train", dest="part_pq_train", type=int, default=2000, metavar="N",
                   help="train-split images the pq8 codebooks learn from (default 2000, never the validation slice)")
    p.add_argument("--data-dir", dest="part_data_dir", metavar="DIR", help="MNIST IDX directory (default data/mnist)")


def table(manifest: dict) -> str:
    """The manifest as a text table: bytes per frame per codec (payload / whole frame), accuracy, latency."""
    codecs = [c for c in manifest["codecs"] if any(c in cut["codecs"] for cut in manifest["cuts"])]
    raw = manifest["input"]
    lines = [f"{manifest['model']} ({manifest['source']}, sha256 {manifest['sha256'][:12]}), runtime "
             f"{manifest['runtime']}; raw frame {raw['raw_payload_bytes']} B payload / {raw['raw_frame_bytes']} B "
             f"frame; bytes are payload/frame with device id {manifest['reference_device_id']}"]
    head = f"{'cut':<24} {'shape':<12}" + "".join(f" {c:>15}" for c in codecs)
    acc_split = "val" if "accuracy" in manifest else None
    if acc_split:
        head += "   accuracy % (val) " + " ".join(f"{c:>7}" for c in codecs)
    prof = manifest.get("whole_ms", {})
    if prof:
        head += "   ms head/tail"
    lines.append(head)
    for cut in manifest["cuts"]:
        row = f"{cut['id']:<24} {'x'.join(map(str, cut['shape'])):<12}"
        for c in codecs:
            b = cut["codecs"].get(c)
            row += f" {(str(b['payload_bytes']) + '/' + str(b['frame_bytes'])) if b else '-':>15}"
        if acc_split:
            row += "   " + " " * 18 + " ".join(
                f"{100 * cut['accuracy'][c]['val']:7.2f}" if c in cut.get("accuracy", {}) else f"{'-':>7}"
                for c in codecs)
        for key, p in cut.get("profile", {}).items():
            row += "   " + key + " " + ", ".join(f"b{b} {p['head_ms'][b]:.3f}/{p['tail_ms'][b]:.3f}"
                                                for b in p["head_ms"])
        lines.append(row)
    if acc_split:
        lines.append("whole model accuracy: " + ", ".join(f"{k} {100 * v:.2f} %"
                                                          for k, v in manifest["accuracy"].items()))
    for key, p in prof.items():
        lines.append(f"whole model on {key}: " + ", ".join(f"batch {b} {ms:.3f} ms" for b, ms in p.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    from edge_workers.runtime import load_runtime
    from modelstore.partition import model_name
    from modelstore.partition_files import save_manifest, write_partition

    model = Path(args.part_model)
    if not model.is_file():
        raise FileNotFoundError(f"model file not found: {model}")
    out_dir = Path(args.part_out_dir) if args.part_out_dir else model.parent / "partitions" / model_name(model)
    cuts = "all" if args.part_cut == "all" else _names(args.part_cut)
    manifest = write_partition(model, out_dir, cuts, args.part_codecs, progress)

    def load(key: str, path: str):
        return load_runtime(key, path, threads=1)

    if args.part_accuracy or args.part_pq:
        from cloud_workers.train import TrainConfig, split_train
        from publishers.datasets import load_mnist
        from publishers.sources import default_data_dir

        data_dir = Path(args.part_data_dir) if args.part_data_dir else default_data_dir()
        fit, val = split_train(load_mnist(data_dir, "train"), None, TrainConfig().seed)
    if args.part_pq:
        from modelstore.partition_pq import add_pq

        add_pq(manifest, out_dir, load, fit.images[: args.part_pq_train], args.part_pq_dsub, progress=progress)
    if args.part_accuracy:
        from modelstore.partition_eval import evaluate_partition

        test = load_mnist(data_dir, "test")
        evaluate_partition(manifest, out_dir, model, load, {"val": val, "test": test}, progress=progress)
    if args.part_profile:
        from modelstore.profiles import profile_partition

        runtimes = args.part_runtimes or (manifest["runtime"],)
        profile_partition(manifest, out_dir, model, load, runtimes, args.part_batches, progress=progress)
    path = save_manifest(out_dir, manifest)
    print(table(manifest))
    print(f"wrote {len(manifest['cuts'])} head/tail pairs and {path}")
    return 0
