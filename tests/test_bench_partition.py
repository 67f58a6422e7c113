"""`edgeq bench partition` with tiny settings: one emulated link, two modes, 2 s each (real Mosquitto, local Ray).

Checks the run's table has a row per mode with numbers computed from the run; not the speeds (noisy on a shared
host).
"""

from __future__ import annotations

import math

from infra.bench import partition as bench_partition
from infra.bench.partition import PAGE
from infra.cli import build_parser
from tests.conftest import DATA_DIR

ARGS = ["bench", "partition", "--links", "10mbit-10ms", "--modes", "all-cloud,best-fixed-split", "--cuts", "pool2",
        "--seconds", "2", "--rate", "40", "--devices", "2", "--transfer-s", "0.5", "--pings", "5"]


def test_registered_in_the_cli() -> None:
    args = build_parser().parse_args(["bench", "partition", "--quick", "--links", "1mbit-50ms"])
    assert (args.benchmark, args.quick, args.links) == ("partition", True, "1mbit-50ms")


def test_tiny_run_has_rows_with_real_numbers(tmp_path, monkeypatch) -> None:
    import infra.bench.partition_modes as modes

    captured = []
    measure = modes.measure

    def spy(specs, cfg, progress, work_dir):
        cfg.data_dir = str(DATA_DIR)
        captured.extend(measure(specs, cfg, progress, work_dir))
        return captured

    monkeypatch.setattr(modes, "measure", spy)
    args = build_parser().parse_args([*ARGS, "--out-dir", str(tmp_path)])
    text = bench_partition.run(args, progress=lambda line: None)

    assert [r.mode for r in captured] == ["all-cloud", "best-fixed-split"]
    sent = 2 * 40 * 2 // 2  # 40 frames/s for 2 s, about every one answered
    for r in captured:
        assert r.link == "10mbit-10ms" and r.frames >= 0.9 * sent, (r.mode, r.frames)
        assert all(math.isfinite(v) and v > 0 for v in (r.p50_ms, r.p99_ms, r.cpu_us_per_frame)), r
        assert r.p99_ms >= r.p50_ms >= 5.0  # at least the link's one-way 5 ms up, stamped at the answering tier
        assert 0.9 <= r.accuracy <= 1.0, r
    cloud, split = captured
    # Raw frames: 784 pixels + header; the int8 pool2 tensor frame is 590 bytes + a longer device id.
    assert 800 < cloud.bytes_per_frame["device_to_edge"] < 860 and cloud.split.startswith("input raw")
    assert 560 < split.bytes_per_frame["device_to_edge"] < 620 and split.split == "pool2 int8"
    assert split.bytes_per_frame["edge_to_cloud"] == split.bytes_per_frame["device_to_edge"]  # forwarded as it came
    page = (tmp_path / PAGE).read_text()
    assert "| 10mbit-10ms | all-cloud |" in page and "| 10mbit-10ms | best-fixed-split | pool2 int8 |" in page
    assert "Not done: the adaptive run" in page and "Modes per link" in text
    assert (tmp_path / "partition_latency.png").stat().st_size > 1000
