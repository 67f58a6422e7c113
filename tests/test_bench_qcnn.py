"""Tests of `edgeq bench qcnn`: its int8 baseline, timing helper, wide-FC model, report writer, and an end-to-end
quick run."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_workers.runtime import load_runtime
from infra.bench.models import (
    build_wide_fc,
    calibration_reader,
    predict_batched,
    quantize_int8_qdq,
    relative_error,
)
from infra.bench.report import Table, write_markdown
from infra.bench.timing import measure_interleaved, measure_latency
from infra.cli import build_parser, cmd_bench
from modelstore.interface import to_input
from publishers.datasets import load_mnist

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "mnist"
EDGE = ROOT / "models" / "edge_cnn.onnx"
VARIANTS = ("float", "int8 QDQ", "Q-CNN k-means", "Q-CNN EC", "Q-CNN EC native", "Q-CNN EC native segments")


def _accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    rt = load_runtime("onnx", path, threads=1)
    return float(np.mean(predict_batched(rt.predict, to_input(images)).argmax(axis=1) == labels))


def test_int8_qdq_baseline_keeps_accuracy(tmp_path):
    # A fair baseline: onnxruntime's static QDQ int8 must not lose accuracy on this easy model.
    train, test = load_mnist(DATA, "train"), load_mnist(DATA, "test")
    calib = to_input(train.images[np.random.default_rng(0).permutation(len(train))[:128]])
    out = tmp_path / "edge.int8.onnx"
    settings = quantize_int8_qdq(EDGE, out, calib)
    assert settings["format"] == "QDQ" and settings["per_channel"] is True
    assert out.stat().st_size < EDGE.stat().st_size / 3  # observed 92,679 vs 322,909 bytes
    acc_float = _accuracy(EDGE, test.images, test.labels)
    acc_int8 = _accuracy(out, test.images, test.labels)
    assert acc_float > 0.98
    assert abs(acc_int8 - acc_float) <= 0.01, f"float {acc_float:.4f}, int8 {acc_int8:.4f}"  # observed -0.03 points


def test_calibration_reader_yields_every_input_then_rewinds():
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    reader = calibration_reader("input", x, batch=4)
    got = [b["input"] for b in iter(reader.get_next, None)]
    assert [len(b) for b in got] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(got), x)
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["input"], x[:4])
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        calibration_reader("input", np.zeros((0, 3), np.float32))


def test_measure_latency_reports_positive_median_and_p90():
    lat = measure_latency(lambda: sum(range(1000)), repeats=30, warmup=2)
    assert lat.runs == 30
    assert 0 < lat.median_ms <= lat.p90_ms


def test_measure_interleaved_alternates_blocks_and_keeps_each_budget():
    order = []
    fns = {"fast": lambda: order.append("fast"), "slow": lambda: (order.append("slow"), time.sleep(0.01))}
    lats = measure_interleaved(fns, repeats=25, block=10, warmup=1, min_repeats=3, max_seconds=0.05)
    assert lats["fast"].runs == 25 and 3 <= lats["slow"].runs <= 10  # slow: stopped by its 50 ms budget
    assert order[2:12] == ["fast"] * 10 and order[12] == "slow"  # after the 2 warm-up calls: blocks of 10
    assert lats["slow"].median_ms >= 10 > lats["fast"].median_ms
    with pytest.raises(ValueError, match="block must be >= 1"):
        measure_interleaved(fns, repeats=5, block=0)


def test_measure_latency_stops_at_time_budget():
    lat = measure_latency(lambda: time.sleep(0.01), repeats=1000, warmup=0, min_repeats=3, max_seconds=0.05)
    assert 3 <= lat.runs < 20
    assert lat.median_ms >= 10.0
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(lambda: None, repeats=0)


def test_wide_fc_matches_numpy(tmp_path):
    w, b = build_wide_fc(tmp_path / "fc.onnx", d_in=256, d_out=96, seed=3)
    assert w.shape == (96, 256) and b.shape == (96,)
    rt = load_runtime("onnx", tmp_path / "fc.onnx", threads=1)
    assert rt.input_shape == (256,)
    x = np.random.default_rng(4).standard_normal((5, 256), dtype=np.float32)
    y = rt.predict(x)
    np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-5, atol=1e-5)  # observed max |diff| ~1e-6
    assert relative_error(y, x @ w.T + b) < 1e-5
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(y[:, :3], y)


def test_markdown_writer_writes_given_tables(tmp_path):
    t1 = Table("Sizes", ["variant", "bytes", "accuracy %"], note="a note")
    t1.add("float", "322,909", "99.33")
    t1.add("wide | fc", "1,000", "n/a")
    t2 = Table("Latency", ["batch", "median ms"])
    t2.add(1, "0.050")
    with pytest.raises(ValueError, match="3 columns, row has 2"):
        t1.add("only", "two")
    path = write_markdown(tmp_path / "r" / "out.md", "Title", [t1, t2], {"CPU": "test cpu"}, "edgeq bench x --quick",
                          notes=["n1"], images=[("plot", "p.png")])
    text = path.read_text()
    assert text.startswith("# Title\n")
    for needle in ("### Sizes", "| variant | bytes | accuracy % |", "| --- | ---: | ---: |",
                   "| float | 322,909 | 99.33 |",
                   "| wide \\| fc | 1,000 | n/a |", "a note", "### Latency", "| 1 | 0.050 |", "| CPU | test cpu |",
                   "edgeq bench x --quick", "- n1", "![plot](p.png)"):
        assert needle in text, needle
    assert "\nfloat      322,909       99.33\nwide | fc    1,000         n/a\n" in t1.text()  # numbers right-aligned


def test_cli_has_bench_qcnn_subcommand():
    args = build_parser().parse_args(["bench", "qcnn", "--quick", "--repeats", "3", "--skip-sweep"])
    assert args.func is cmd_bench and args.benchmark == "qcnn"
    assert (args.quick, args.repeats, args.skip_sweep) == (True, 3, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench"])  # a benchmark name is required


def _md_rows(text: str, heading: str) -> list[list[str]]:
    """Body rows of the Markdown table under `### heading`."""
    section = text.split(f"### {heading}", 1)[1].split("\n### ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")][2:]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]


def test_bench_qcnn_quick_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "infra.cli", "bench", "qcnn", "--quick", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    md, png = tmp_path / "qcnn.md", tmp_path / "qcnn_sweep.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "edgeq bench qcnn --quick --out-dir" in text and "| onnxruntime |" in text
    models = ("edge CNN", "cloud CNN", "wide FC 256->256")

    sizes = {(r[0], r[1]): r for r in _md_rows(text, "Size and accuracy")}
    assert set(sizes) == {(m, v) for m in models for v in VARIANTS}
    for v in VARIANTS:
        assert float(sizes["edge CNN", v][4]) > 90.0  # accuracy %, every variant still classifies
        assert float(sizes["cloud CNN", v][4]) > 90.0
        assert sizes["wide FC 256->256", v][4] == "n/a"
    for m in models:
        for v in VARIANTS[1:]:
            assert float(sizes[m, v][3]) > 1.0, (m, v)  # compression ×: every variant is smaller than float

    latency = {(r[0], r[1], r[2], r[3]) for r in _md_rows(text, "Latency (ms per call)")}
    threads = {t for (_, _, t, _) in latency}
    assert "1" in threads
    assert latency == {(m, b, t, v) for m in models for b in ("1", "32") for t in threads for v in VARIANTS}

    layers = _md_rows(text, "Per-layer response error (Q-CNN, k-means vs error correction)")
    assert {r[0] for r in layers} == set(models)
    for m in models:  # each model has product-quantized layers, and every one has both errors
        pq = [r for r in layers if r[0] == m and r[3] == "pq"]
        assert pq and all(float(r[-2]) >= 0 and float(r[-1]) >= 0 for r in pq), layers

    ratios = {(r[0], r[1], r[2]) for r in _md_rows(text, "Q-CNN native vs onnxruntime (same run)")}
    assert ratios == {(m, b, t) for m in models for b in ("1", "32") for t in threads}
    targets = {r[0]: r for r in _md_rows(text, "Q-CNN targets (this run)")}
    assert "edge CNN, batch 32, 1 thread(s): float / native" in targets
    assert "cloud CNN: compression (EC file)" in targets
    profile = _md_rows(text, "Per-layer time (1 thread, µs per sample)")
    for m in ("edge CNN", "cloud CNN"):  # both runtimes, both batches, and every layer has a time
        rows = [r for r in profile if r[0] == m]
        assert {(r[1], r[2]) for r in rows} == {(b, rt) for b in ("1", "32") for rt in ("Q-CNN EC native", "float")}
        assert all(float(r[4]) >= 0 for r in rows)
        assert any(r[3].startswith("PQ conv") for r in rows)

    sweep = {(r[0], r[1]) for r in _md_rows(text, "Sweep over K and dsub (edge CNN, conv and FC layers alike)")}
    assert sweep == {("8", "8"), ("32", "8")}
    assert "Size and accuracy" in proc.stdout and "speed-up" in proc.stdout  # tables also on stdout


def test_frontier_keeps_points_nothing_beats_and_plots(tmp_path):
    from infra.bench.sweep import FrontierPoint, frontier_table, pareto, plot_frontier

    pts = [FrontierPoint("a", 100, 0.990), FrontierPoint("b", 80, 0.992), FrontierPoint("c", 60, 0.985),
           FrontierPoint("d", 90, 0.991), FrontierPoint("e", 50, 0.980)]
    assert [p.name for p in pareto(pts)] == ["e", "c", "b"]  # a and d: b is smaller and more accurate
    rows = {r[0]: r for r in frontier_table(pts, 1000, 0.993).rows}
    assert rows["b"][-1] == "yes" and rows["a"][-1] == "" and rows["b"][2] == "12.50"
    png = plot_frontier(tmp_path / "f.png", pts, 1000, 0.993)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
