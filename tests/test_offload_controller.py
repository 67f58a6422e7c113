"""The adaptive offload controller (edge_workers/offload_controller.py): dwell, direction, step bound, convergence
bound on a simulated plant, edge-only fallback and recovery, split choice with hysteresis."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from edge_workers.offload_controller import (
    EDGE_ONLY,
    OFFLOAD,
    REASONS,
    ControllerConfig,
    Measurement,
    OffloadController,
    convergence_bound,
)
from edge_workers.split_planner import INPUT, OUTPUT, Option
from modelstore.profiles import LinkProfile

OPTS = [Option(INPUT, "raw", 0.0, 0.2, 828, 0.99), Option("m@pool2", "int8", 0.3, 0.1, 590, 0.99),
        Option(OUTPUT, "", 10.0, 0.0, 0, 0.99)]
FAST, SLOW = LinkProfile("fast", 1e9, 0.1), LinkProfile("slow", 1e6, 1.0)


class Plant:
    """Confidence routing on a fixed stream: frames/s `rate`, a sorted sample of confidences; a frame with
    confidence < threshold crosses with the split's bytes; p99 is the edge's unless >= 1 % of frames cross."""

    def __init__(self, confidences, rate, edge_ms=3.0, hop_ms=40.0):
        self.conf, self.rate, self.edge_ms, self.hop_ms = sorted(confidences), rate, edge_ms, hop_ms

    def fraction_below(self, theta):
        return sum(c < theta for c in self.conf) / len(self.conf)

    def measure(self, t, decision, nbytes=828, failures=0, link=None):
        if decision.mode == EDGE_ONLY:
            return Measurement(t, 0.0, self.edge_ms, failures, link)
        f = self.fraction_below(decision.threshold)
        nbytes = decision.option.bytes if decision.option is not None else nbytes
        p99 = self.edge_ms + (self.hop_ms if f >= 0.01 else 0.0)
        return Measurement(t, self.rate * f * nbytes, p99, failures, link)


def run(ctl, plant, seconds, tick_s=1.0, t0=0.0, **kw):
    """Tick every tick_s for `seconds`; returns [(t, decision)] of the ticks."""
    out, t = [], t0
    while t < t0 + seconds:
        out.append((t, ctl.tick(plant.measure(t, ctl.decision, **kw))))
        t += tick_s
    return out


def changes(trace):
    return [(t, d) for t, d in trace if d.changed]


def test_convergence_bound_of_the_defaults_counted_by_hand():
    # span 0.9, step 0.1, res 0.01: 7 full steps to a 0.2 bracket, 5 halvings to <= 0.01, a split, a jump
    assert convergence_bound(ControllerConfig()) == 1 + 7 + 5 + 1
    assert convergence_bound(ControllerConfig(threshold_min=0.9)) == 2  # nothing to search


def test_over_budget_lowers_the_threshold_underused_raises_it():
    cfg = ControllerConfig(uplink_budget_kbps=8.0, min_period_s=5.0, reprobe_after_s=None)  # 1000 B/s
    ctl = OffloadController(cfg)
    d = ctl.tick(Measurement(0.0, uplink_bytes_per_s=5000.0))
    assert (d.changed, d.reason, d.threshold) == (True, "over_budget", pytest.approx(0.8))  # one max_step down
    assert ctl.tick(Measurement(1.0, uplink_bytes_per_s=5000.0)).reason == "dwell"
    d = ctl.tick(Measurement(5.0, uplink_bytes_per_s=100.0))  # 0.1 of the budget: underused
    assert (d.reason, d.threshold) == ("under_budget", pytest.approx(0.85))  # half the bracket [0.8, 0.9]
    d = ctl.tick(Measurement(10.0, uplink_bytes_per_s=900.0))  # 0.9: in the band, hold
    assert (d.changed, d.reason, d.threshold) == (False, "in_band", pytest.approx(0.85))
    assert ctl.tick(Measurement(15.0, p99_ms=500.0)).reason == "no_data"  # no p99 budget, no uplink figure


def test_p99_budget_alone_drives_the_threshold_and_no_budget_holds():
    ctl = OffloadController(ControllerConfig(p99_budget_ms=50.0, min_period_s=0.0))
    assert ctl.tick(Measurement(0.0, uplink_bytes_per_s=1e9, p99_ms=80.0)).reason == "over_budget"
    assert ctl.tick(Measurement(1.0, p99_ms=10.0)).reason == "under_budget"
    free = OffloadController(ControllerConfig())
    d = free.tick(Measurement(0.0, uplink_bytes_per_s=1e12, p99_ms=1e6))
    assert (d.reason, d.threshold) == ("no_budget", 0.9)


@st.composite
def tick_streams(draw):
    n = draw(st.integers(1, 120))
    gaps = draw(st.lists(st.floats(0.0, 4.0), min_size=n, max_size=n))
    ups = draw(st.lists(st.one_of(st.none(), st.floats(0.0, 5000.0)), min_size=n, max_size=n))
    p99s = draw(st.lists(st.one_of(st.none(), st.floats(0.0, 300.0)), min_size=n, max_size=n))
    fails = draw(st.lists(st.sampled_from([0, 0, 0, 1, 5]), min_size=n, max_size=n))
    links = draw(st.lists(st.sampled_from([None, FAST, SLOW]), min_size=n, max_size=n))
    return gaps, ups, p99s, fails, links


@seed(20261128)
@settings(max_examples=300, deadline=None)
@given(tick_streams(), st.floats(0.0, 10.0), st.floats(0.02, 0.3), st.sampled_from([None, 15.0]))
def test_never_faster_than_the_period_steps_bounded_directions_right(stream, period, step, reprobe):
    cfg = ControllerConfig(uplink_budget_kbps=8.0, p99_budget_ms=100.0, min_period_s=period, max_step=step,
                           resolution=min(0.01, step), reprobe_after_s=None if reprobe is None else period + reprobe)
    ctl, t, last_change, prev = OffloadController(cfg, OPTS), 0.0, None, ctl_decision(cfg)
    for gap, up, p99, fail, link in zip(*stream, strict=True):
        t += gap
        d = ctl.tick(Measurement(t, up, p99, fail, link))
        assert d.reason in REASONS
        assert cfg.threshold_min <= d.threshold <= cfg.threshold_max
        assert abs(d.threshold - prev.threshold) <= cfg.max_step + 1e-12
        if d.changed:
            if d.reason != "cloud_unreachable":  # the fallback alone is immediate
                assert last_change is None or t - last_change >= period
            if d.reason == "over_budget":
                assert d.threshold < prev.threshold and ctl.utilisation(Measurement(t, up, p99)) > 1
            if d.reason == "under_budget":
                assert d.threshold > prev.threshold and ctl.utilisation(Measurement(t, up, p99)) < cfg.low_water
            last_change = t
        else:
            assert (d.mode, d.threshold, d.option) == (prev.mode, prev.threshold, prev.option)
        prev = d


def ctl_decision(cfg):
    return OffloadController(cfg).decision


@seed(20261129)
@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=20, max_size=200), st.floats(10.0, 2000.0),
       st.floats(0.5, 400.0), st.sampled_from([None, 30.0]), st.floats(0.02, 0.3), st.floats(0.0, 0.5))
def test_converges_within_the_bound_on_a_simulated_plant(confs, rate, budget_kbps, p99_budget, step, tmin):
    cfg = ControllerConfig(uplink_budget_kbps=budget_kbps, p99_budget_ms=p99_budget, min_period_s=5.0,
                           max_step=step, resolution=min(0.01, step), threshold_min=tmin, reprobe_after_s=None)
    plant, tick = Plant(confs, rate), 1.0
    ctl = OffloadController(cfg, OPTS)
    bound = convergence_bound(cfg)
    trace = run(ctl, plant, bound * (cfg.min_period_s + tick) + 60.0, tick, link=SLOW)
    moves = changes(trace)
    assert len(moves) <= bound
    assert not moves or moves[-1][0] <= bound * (cfg.min_period_s + tick)
    theta, nbytes = ctl.decision.threshold, ctl.decision.option.bytes
    assert (ctl.decision.option.cut, ctl.decision.option.codec) == ("m@pool2", "int8")  # the slow link's split

    def u(th):
        f = plant.fraction_below(th)
        terms = [rate * f * nbytes / cfg.uplink_budget_bytes_per_s]
        if p99_budget is not None:
            terms.append((plant.edge_ms + (plant.hop_ms if f >= 0.01 else 0.0)) / p99_budget)
        return max(terms)

    assert u(theta) <= 1.0 or theta == cfg.threshold_min  # the budget is met unless nothing can be cut
    # ... and not by giving away more than the resolution: in the band, at the top, or a step up is over
    assert (u(theta) >= cfg.low_water or theta >= cfg.threshold_max - cfg.resolution - 1e-12
            or u(theta + cfg.resolution) > 1.0 or u(theta) > 1.0)


def test_load_change_moves_the_threshold_down_then_back_up_with_reprobe():
    confs = [i / 100 for i in range(100)]  # fraction below theta = theta
    cfg = ControllerConfig(uplink_budget_kbps=8 * 828 * 50 * 0.5 / 1000, min_period_s=5.0, reprobe_after_s=30.0)
    ctl = OffloadController(cfg)  # budget: 50 frames/s x 828 B x half the frames
    trace = run(ctl, Plant(confs, 50.0), 120.0)
    assert 0.4 <= ctl.decision.threshold <= 0.5  # u = theta / 0.5 within [0.8, 1]
    run(ctl, Plant(confs, 200.0), 150.0, t0=120.0)  # 4x the load: a quarter of the fraction
    assert 0.1 <= ctl.decision.threshold <= 0.125
    later = run(ctl, Plant(confs, 50.0), 200.0, t0=270.0)  # the load falls back: reprobe finds the slack
    assert 0.4 <= ctl.decision.threshold <= 0.5
    assert any(d.reason == "under_budget" for _, d in later)
    assert all(d.threshold <= 0.9 for _, d in trace)


def test_unreachable_cloud_falls_back_at_once_and_recovers_after_the_dwell():
    cfg = ControllerConfig(uplink_budget_kbps=8.0, min_period_s=5.0, fail_after=3, recover_ticks=2)
    ctl = OffloadController(cfg, OPTS)
    d = ctl.tick(Measurement(0.0, 500.0, link=SLOW))
    assert (d.reason, d.option.cut) == ("split_changed", "m@pool2")
    assert ctl.tick(Measurement(1.0, 500.0, cloud_failures=2)).mode == OFFLOAD  # two failures: not yet
    d = ctl.tick(Measurement(1.5, 500.0, cloud_failures=3))  # within the dwell: the fallback does not wait
    assert (d.mode, d.reason, d.changed, d.option.cut) == (EDGE_ONLY, "cloud_unreachable", True, "m@pool2")
    assert ctl.tick(Measurement(2.0, 0.0, cloud_failures=9)).reason == "cloud_unreachable"
    assert ctl.tick(Measurement(3.0, 0.0)).reason == "edge_only"   # healthy tick 1
    assert ctl.tick(Measurement(4.0, 0.0)).reason == "edge_only"   # healthy tick 2, dwell not over (1.5 + 5)
    d = ctl.tick(Measurement(6.5, 0.0))
    assert (d.mode, d.reason, d.threshold, d.option.cut) == (OFFLOAD, "cloud_recovered", 0.9, "m@pool2")
    flapping = OffloadController(cfg)
    for t in range(40):  # fails every other tick: stays edge-only, never rushes back
        flapping.tick(Measurement(float(t), 0.0, cloud_failures=3 * (t % 2)))
        assert flapping.decision.mode == EDGE_ONLY or t == 0


def test_split_follows_the_link_with_hysteresis():
    cfg = ControllerConfig(min_period_s=5.0, switch_margin=0.1)
    ctl = OffloadController(cfg, OPTS)
    assert ctl.tick(Measurement(0.0)).option is None  # no link estimate yet: the worker's own codec
    d = ctl.tick(Measurement(1.0, link=FAST))
    assert (d.reason, d.option.cut, d.predicted_ms) == ("split_changed", INPUT, pytest.approx(0.3 + 828 * 8e-6))
    assert ctl.tick(Measurement(2.0, link=SLOW)).reason == "dwell"
    d = ctl.tick(Measurement(6.0, link=SLOW))  # 6.1 ms split vs 7.8 ms raw: 22 % faster
    assert (d.reason, d.option.cut) == ("split_changed", "m@pool2")
    nearly = LinkProfile("nearly", 1e6, 1.0 + 0.0)  # equal link: no reason to move
    assert not ctl.tick(Measurement(20.0, link=nearly)).changed
    # on a link where raw is better by under 10 % the split stays
    close = LinkProfile("close", 1.3e7, 0.0)  # raw 0.2 + 0.51 = 0.71 ms, split 0.4 + 0.36 = 0.76 ms
    assert ctl.tick(Measurement(30.0, link=close)).option.cut == "m@pool2"
    dead = LinkProfile("dead", 1e3, 500.0)
    assert ctl.tick(Measurement(40.0, link=dead)).option.cut == OUTPUT


def test_accuracy_floor_keeps_the_split_off_lossy_options():
    opts = OPTS[:2] + [Option("m@pool2", "float32", 0.3, 0.1, 2122, 0.995)]
    ctl = OffloadController(ControllerConfig(accuracy_floor=0.993), opts)
    assert ctl.tick(Measurement(0.0, link=SLOW)).option.codec == "float32"


@pytest.mark.parametrize("kw, match", [
    ({"uplink_budget_kbps": 0.0}, "uplink_budget_kbps must be finite and > 0"),
    ({"p99_budget_ms": math.inf}, "p99_budget_ms must be finite and > 0"),
    ({"threshold_min": 0.95}, "threshold_min <= threshold_max"),
    ({"resolution": 0.5}, "resolution <= max_step"),
    ({"low_water": 1.0}, "low_water must be in"),
    ({"fail_after": 0}, "fail_after and recover_ticks must be >= 1"),
    ({"reprobe_after_s": 1.0}, "reprobe_after_s must exceed min_period_s"),
])
def test_bad_config_names_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        ControllerConfig(**kw)


def test_time_going_backwards_is_refused():
    ctl = OffloadController()
    ctl.tick(Measurement(10.0))
    with pytest.raises(ValueError, match="non-decreasing: got 9.0 after 10.0"):
        ctl.tick(Measurement(9.0))


def test_decisions_and_link_estimates_reach_the_split_metrics():
    from prometheus_client import REGISTRY

    from edge_workers.link_estimator import LinkEstimator
    from edge_workers.split_metrics import SplitMetrics

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, {"hop": "device_to_edge", **labels})

    metrics, ctl = SplitMetrics("device_to_edge"), OffloadController(ControllerConfig(uplink_budget_kbps=8.0), OPTS)
    link = LinkEstimator(SLOW).estimate(0.0)
    m = Measurement(0.0, 5000.0, link=SLOW)
    metrics.record(ctl.tick(m), ctl.utilisation(m), link)
    assert value("edgeq_split_choice", cut="m@pool2", codec="int8") == 1
    assert value("edgeq_split_decisions_total", reason="split_changed", changed="true") == 1
    assert value("edgeq_split_predicted_latency_seconds") == pytest.approx((0.4 + 590 * 8e-3 + 1.0) / 1e3)
    assert value("edgeq_split_budget_utilisation_ratio") == pytest.approx(5.0)
    assert value("edgeq_split_link_bandwidth_bytes_per_second") == 1e6 / 8
    assert value("edgeq_split_link_rtt_seconds") == pytest.approx(1e-3)
    m = Measurement(10.0, 5000.0, cloud_failures=3, link=FAST)
    metrics.record(ctl.tick(m))
    assert value("edgeq_split_mode", mode="edge-only") == 1 and value("edgeq_split_mode", mode="offload") == 0
    assert value("edgeq_split_threshold") == pytest.approx(0.9)
    metrics.record(ctl.tick(Measurement(20.0, link=FAST)))
    metrics.record(ctl.tick(Measurement(30.0, link=FAST)))
    metrics.record(ctl.tick(Measurement(40.0, link=FAST)))  # recovered at 40, then the raw frame is faster
    metrics.record(ctl.tick(Measurement(50.0, link=FAST)))
    assert value("edgeq_split_choice", cut=INPUT, codec="raw") == 1
    assert value("edgeq_split_choice", cut="m@pool2", codec="int8") == 0
    metrics.observe_latency(0.03)
    assert value("edgeq_split_measured_latency_seconds_bucket", le="0.05") == 1
    with pytest.raises(ValueError, match="unknown hop 'uplink'"):
        SplitMetrics("uplink")
