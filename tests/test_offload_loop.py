"""The offload controller in the edge worker: the loop object on synthetic counters with a fake clock, then an edge
actor under a tiny uplink budget with a real Mosquitto and a local Ray."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from cloud_workers.config import CloudConfig, RayConfig
from edge_workers.config import EdgeConfig
from edge_workers.offload_controller import (
    EDGE_ONLY,
    OFFLOAD,
    ControllerConfig,
    OffloadController,
)
from edge_workers.offload_loop import NullLoop, OffloadLoop
from infra import cluster
from infra.collector import ResultCollector
from publishers.config import PublishConfig
from publishers.errors import ConfigError
from publishers.run import publish
from tests.conftest import DATA_DIR
from tests.test_pipeline import scrape, value


class Plant:
    """A fake edge: `rate` frames/s, the fraction below the threshold offloaded at `frame_bytes` each."""

    def __init__(self, rate: float = 100.0, frame_bytes: int = 784):
        self.t, self.bytes, self.threshold = 0.0, 0, 0.9
        self.rate, self.frame_bytes = rate, frame_bytes

    def clock(self) -> float:
        return self.t

    def set_threshold(self, theta: float) -> None:
        self.threshold = theta

    def advance(self, seconds: float) -> None:
        """Offload threshold x rate frames/s (confidence uniform in [0, 1]) for `seconds`."""
        self.t += seconds
        self.bytes += int(self.rate * seconds * self.threshold * self.frame_bytes)


def make_loop(plant: Plant, budget_kbps: float, probe=None) -> OffloadLoop:
    ctl = OffloadController(ControllerConfig(uplink_budget_kbps=budget_kbps, threshold_max=0.9, min_period_s=1.0))
    return OffloadLoop(ctl, 0.5, lambda: plant.bytes, plant.set_threshold, probe=probe, clock=plant.clock)


def run(plant: Plant, loop: OffloadLoop, seconds: float, step: float = 0.125) -> list:  # exact in binary
    decisions = []
    for _ in range(round(seconds / step)):
        plant.advance(step)
        d = loop.maybe_tick()
        if d is not None:
            decisions.append(d)
    return decisions


def test_threshold_goes_down_over_the_uplink_budget_and_back_up_when_underused() -> None:
    plant = Plant()  # at 0.9: 70,560 B/s offloaded
    loop = make_loop(plant, budget_kbps=200.0)  # 25,000 B/s: met at threshold <= 0.319, underused below 0.255
    assert plant.threshold == 0.9
    decisions = run(plant, loop, 30.0)
    assert len(decisions) == 60  # one tick per 0.5 s control period
    down = [d for d in decisions if d.changed and d.reason == "over_budget"]
    assert down and all(b.threshold < a.threshold for a, b in itertools.pairwise(down))
    assert 0.2 < plant.threshold <= 0.319, plant.threshold  # budget met, not much given away
    # The load eases (fewer frames): the budget is underused and, once the controller forgets the threshold it
    # measured over budget (reprobe_after_s, 60 s), the threshold goes back up, to its maximum.
    plant.rate = 20.0
    run(plant, loop, 80.0)
    assert 0.9 - 0.01 <= plant.threshold <= 0.9  # within the resolution of the maximum (0.893 measured)
    assert loop.decision.mode == OFFLOAD


def test_cloud_failures_switch_to_edge_only_and_a_healthy_probe_brings_offload_back() -> None:
    plant = Plant(rate=10.0)  # 7 kB/s: well under a 1 Mbit/s budget
    outcomes = {"ok": False}
    loop = make_loop(plant, budget_kbps=1000.0, probe=lambda: (lambda: outcomes["ok"]))
    run(plant, loop, 2.0)
    assert loop.decision.mode == OFFLOAD and plant.threshold == pytest.approx(0.9)
    for _ in range(3):  # ControllerConfig.fail_after
        loop.on_call_failed()
    d = run(plant, loop, 1.0)[0]
    assert d.mode == EDGE_ONLY and d.reason == "cloud_unreachable" and d.changed
    assert plant.threshold == 0.0  # confidence is never below 0: nothing goes to the cloud
    run(plant, loop, 5.0)  # the probes keep failing: still edge-only
    assert loop.edge_only and plant.threshold == 0.0
    outcomes["ok"] = True  # the cloud is back: the probes succeed, and after recover_ticks and the dwell ...
    run(plant, loop, 5.0)
    assert loop.decision.mode == OFFLOAD and plant.threshold == pytest.approx(0.9)  # ... the threshold held before


def test_call_outcomes_feed_the_failures_and_the_link_estimate_and_p99() -> None:
    plant = Plant(rate=0.0)
    ctl = OffloadController(ControllerConfig(p99_budget_ms=50.0, threshold_max=0.9, min_period_s=1.0))
    loop = OffloadLoop(ctl, 0.5, lambda: plant.bytes, plant.set_threshold, clock=plant.clock)
    loop.on_call_failed()
    loop.on_call_failed()
    loop.on_call_done(100, 1.0, 1.004)  # a small call: 4 ms RTT
    assert loop.failures == 0
    loop.on_answers([10.0] * 98 + [200.0, 200.0])  # p99 200 ms: four times the budget
    plant.advance(0.5)
    d = loop.maybe_tick()
    assert d.reason == "over_budget" and plant.threshold == pytest.approx(0.8)
    assert loop.estimator.estimate(plant.t).profile.rtt_ms == pytest.approx(4.0, rel=1e-3)


def test_no_budget_no_loop_and_bad_settings_refused() -> None:
    class W:
        cfg = EdgeConfig()
    assert isinstance(OffloadLoop.for_worker(W()), NullLoop)
    with pytest.raises(ConfigError, match="uplink_budget_kbps"):
        EdgeConfig(uplink_budget_kbps=0.0)
    with pytest.raises(ConfigError, match="control_period_s"):
        EdgeConfig(control_period_s=10.0, control_dwell_s=5.0)


# ------------------------------------------------------------------ through a real edge actor

@pytest.fixture
def budget_pipeline(local_ray, broker, mqtt_cfg, request):
    ns = f"test-{request.node.name}"[:60]
    ray_cfg = RayConfig(namespace=ns)
    cloud = cluster.start_cloud(CloudConfig(actors=1, metrics_port=0), ray_cfg)
    edge = None
    try:
        # threshold 1: the operator lets nearly every frame go up (~60 kB/s here); 1 kbit/s = 125 B/s allows
        # about one 784-byte frame in 6 s.
        edge_cfg = EdgeConfig(actors=1, metrics_port=0, threshold=1.0, uplink_budget_kbps=1.0, control_period_s=0.5,
                              control_dwell_s=0.5)
        edge = cluster.start_edge(edge_cfg, mqtt_cfg, ray_cfg, cloud.names)
        yield edge, cloud
    finally:
        if edge is not None:
            cluster.stop_tier(edge)
        cluster.stop_tier(cloud)


def test_edge_actor_under_a_tiny_uplink_budget_lowers_its_threshold_and_its_uplink(budget_pipeline, mqtt_cfg):
    import ray

    edge, _ = budget_pipeline
    handle = edge.handles[0]
    samples = []  # (t, bytes_edge_to_cloud, threshold)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            s = ray.get(handle.stats.remote(), timeout=10)
            samples.append((time.monotonic(), s.get("bytes_edge_to_cloud", 0), s["threshold"]))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    collector = ResultCollector(mqtt_cfg, "test-offload-results").start()
    # A steady stream: 2 noisy devices at 40 frames/s for 10 s (the denoised frames go up, 784 B each).
    pub = PublishConfig(devices=2, count=400, rate_hz=40, noise="gaussian", noise_level=0.3, data_dir=str(DATA_DIR))
    sampler.start()
    try:
        report = publish(mqtt_cfg, pub)
        t_end = time.monotonic()
        assert collector.wait_for(report.total("acked"), 60), f"only {collector.answered()} answered"
    finally:
        stop.set()
        sampler.join(timeout=15)
        answers = collector.stop()
    assert report.total("acked") == 800 and set(answers.unique) == {(f"dev{d}", s) for d in range(2)
                                                                    for s in range(400)}

    def rate(a, b) -> float:
        return (b[1] - a[1]) / (b[0] - a[0])

    during = [s for s in samples if s[0] < t_end - 0.5]  # while the devices were still sending
    start = next(i for i, s in enumerate(during) if s[1] > 0)
    assert len(during) - start >= 10, samples
    first, last = rate(during[max(start - 1, 0)], during[start + 1]), rate(during[-5], during[-1])
    assert first > 125.0, samples  # far over the 125 B/s budget at the start
    assert last < first / 4, (first, last, samples)
    assert during[-1][2] <= 0.8
    m = scrape(edge.metrics_targets())
    assert value(m, "edgeq_split_threshold", hop="edge_to_cloud") <= 0.8
    assert value(m, "edgeq_split_decisions_total", reason="over_budget", changed="true") >= 1
    assert value(m, "edgeq_split_budget_utilisation_ratio", hop="edge_to_cloud") >= 0


def test_budgets_from_the_command_line_the_environment_and_the_example_config() -> None:
    from infra.cli import _apply_sections, build_parser
    from infra.config import load_config
    from tests.conftest import REPO

    for command in ("edge", "demo"):
        args = build_parser().parse_args([command, "--uplink-budget-kbps", "5", "--p99-budget-ms", "40",
                                          "--control-period", "0.5"])
        edge = _apply_sections(load_config(None, {}), args).edge
        assert (edge.uplink_budget_kbps, edge.p99_budget_ms, edge.control_period_s) == (5.0, 40.0, 0.5)
    edge = load_config(None, {"EDGEQ_EDGE__UPLINK_BUDGET_KBPS": "2.5"}).edge
    assert edge.uplink_budget_kbps == 2.5 and edge.p99_budget_ms is None
    edge = load_config(REPO / "infra" / "edgeq.example.yaml", {}).edge
    assert edge.uplink_budget_kbps is None and edge.p99_budget_ms is None and edge.control_dwell_s == 5.0
