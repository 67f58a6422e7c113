"""Accuracy and error of partitioned models: tail(codec(head(x))) against the whole model, per cut and codec.

Runtimes come from a function passed in (``load(key, path)``, i.e. ``edge_workers.runtime.load_runtime``),
as in ``modelstore.profiles``. int8 scales are dynamic (each sample's own max |x|,
``publishers.tensor_codec``), so no data is used to calibrate them; accuracies are reported per split
given (the planner's accuracy floor should use a validation split, the held-out test split is for the record).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelstore.interface import to_input
from modelstore.partition_pq import load_pq
from publishers import tensor_codec as tc
from publishers.datasets import LabelledImages

logger = logging.getLogger(__name__)


def _predict(rt, x: np.ndarray, batch: int = 500) -> np.ndarray:
    return np.concatenate([rt.predict(x[i:i + batch]) for i in range(0, len(x), batch)])


def evaluate_partition(manifest: dict, out_dir: str | Path, source: str | Path, load: Callable[[str, str], Any],
                       splits: Mapping[str, LabelledImages], runtime: str | None = None,
                       progress: Callable[[str], None] = lambda line: None) -> dict:
    """Add to every cut `accuracy[codec][split]` and `max_abs_logit_error[codec]` (vs the whole model on the
    first split); the whole model's accuracy goes to manifest["accuracy"]. Returns `manifest`."""
    key = runtime or manifest["runtime"]
    out_dir = Path(out_dir)
    whole = load(key, str(source))
    inputs = {name: to_input(data.images) for name, data in splits.items()}
    whole_logits = {name: _predict(whole, x) for name, x in inputs.items()}
    manifest["accuracy"] = {name: float(np.mean(whole_logits[name].argmax(1) == splits[name].labels))
                            for name in splits}
    first = next(iter(splits))
    for i, cut in enumerate(manifest["cuts"], 1):
        pq = load_pq(out_dir, cut) if "pq" in cut else None
        head = load(key, str(out_dir / cut["head"]["file"]))
        tail = load(key, str(out_dir / cut["tail"]["file"]))
        acc, err = {}, {}
        for name, x in inputs.items():
            z = _predict(head, x)
            for codec in cut["codecs"]:
                if codec == "pq8" and pq is None:
                    continue
                codes, scales = tc.compute_codes(z, codec, pq)
                logits = _predict(tail, tc.decode_codes(codes, scales, codec, pq))
                acc.setdefault(codec, {})[name] = float(np.mean(logits.argmax(1) == splits[name].labels))
                if name == first:
                    err[codec] = float(np.abs(logits - whole_logits[name]).max())
        cut["accuracy"], cut["max_abs_logit_error"] = acc, err
        progress(f"accuracy: {cut['id']} [{i}/{len(manifest['cuts'])}] "
                 + ", ".join(f"{c} {100 * a[first]:.2f} %" for c, a in acc.items()))
    return manifest
