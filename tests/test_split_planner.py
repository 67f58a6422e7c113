"""The split planner (edge_workers/split_planner.py) against brute force on synthetic profiles, and the link
profiles."""

from __future__ import annotations

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from edge_workers.split_planner import (
    INPUT,
    OUTPUT,
    NoFeasiblePlan,
    Option,
    expected_latency_ms,
    options_from_manifest,
    plan,
)
from modelstore.profiles import KNOWN_LINKS, LinkProfile, TierProfile, links_from_config

CODECS = ("float32", "float16", "int8", "int8-channel")


@st.composite
def profiles(draw):
    """A synthetic chain: per-layer ms on both tiers, bytes per codec at each cut, accuracy per codec, a link."""
    n_layers = draw(st.integers(2, 8))
    ms = st.floats(0.0, 50.0, allow_nan=False)
    lower = draw(st.lists(ms, min_size=n_layers, max_size=n_layers))
    upper = draw(st.lists(ms, min_size=n_layers, max_size=n_layers))
    acc = st.one_of(st.none(), st.floats(0.9, 1.0))
    cuts = []
    for k in range(1, n_layers):
        sizes = draw(st.lists(st.integers(1, 40_000), min_size=len(CODECS), max_size=len(CODECS)))
        accs = draw(st.lists(acc, min_size=len(CODECS), max_size=len(CODECS)))
        cuts.append((k, dict(zip(CODECS, zip(sizes, accs, strict=True), strict=True))))
    link = LinkProfile("synthetic", draw(st.floats(1e3, 1e10)), draw(st.floats(0.0, 500.0)))
    whole_acc = draw(acc)
    return lower, upper, cuts, link, whole_acc


def build_options(lower, upper, cuts, whole_acc):
    opts = [Option(INPUT, "raw", 0.0, sum(upper), 828, whole_acc)]
    for k, per_codec in cuts:
        for codec, (size, acc) in per_codec.items():
            opts.append(Option(f"m@c{k}", codec, sum(lower[:k]), sum(upper[k:]), size, acc))
    opts.append(Option(OUTPUT, "", sum(lower), 0.0, 0, whole_acc))
    return opts


def brute_force(lower, upper, cuts, link, whole_acc, objective, floor, budget):
    """Every (where, codec) pair costed from scratch: the minimum objective value, or None if none is feasible."""
    best = None
    where = [(0, {"raw": (828, whole_acc)})] + cuts + [(len(lower), {"": (0, whole_acc)})]
    for k, per_codec in where:
        for size, acc in per_codec.values():
            if floor is not None and (acc is None or acc < floor):
                continue
            if budget is not None and size > budget:
                continue
            crosses = k < len(lower)
            latency = sum(lower[:k]) + sum(upper[k:]) + (size * 8 / link.bandwidth_bps * 1e3 + link.rtt_ms
                                                          if crosses else 0.0)
            value = (latency, size) if objective == "latency" else (size, latency)
            best = value if best is None or value < best else best
    return best


@seed(20261127)
@settings(max_examples=400, deadline=None)
@given(profiles(), st.sampled_from(["latency", "bytes"]), st.one_of(st.none(), st.floats(0.9, 1.0)),
       st.one_of(st.none(), st.integers(0, 40_000)))
def test_plan_equals_brute_force(profile, objective, floor, budget):
    lower, upper, cuts, link, whole_acc = profile
    opts = build_options(lower, upper, cuts, whole_acc)
    want = brute_force(lower, upper, cuts, link, whole_acc, objective, floor, budget)
    if want is None:
        with pytest.raises(NoFeasiblePlan):
            plan(opts, link, objective, floor, budget)
        return
    got = plan(opts, link, objective, floor, budget)
    value = (got.latency_ms, got.bytes) if objective == "latency" else (got.bytes, got.latency_ms)
    assert value == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert got.latency_ms == pytest.approx(expected_latency_ms(got.option, link))
    assert floor is None or (got.option.accuracy is not None and got.option.accuracy >= floor)
    assert budget is None or got.bytes <= budget


def _opts():
    return [Option(INPUT, "raw", 0.0, 0.2, 828, 0.99), Option("m@pool2", "int8", 0.3, 0.1, 590, 0.99),
            Option("m@pool2", "float32", 0.3, 0.1, 2122, 0.993), Option(OUTPUT, "", 10.0, 0.0, 0, 0.99)]


def test_fast_link_sends_the_raw_frame_slow_link_cuts_dead_link_stays_local():
    fast = LinkProfile("fast", 10e9, 0.0)
    assert plan(_opts(), fast).option.cut == INPUT  # 0.2 ms upstairs beats 0.4 ms split
    slow = LinkProfile("slow", 1e6, 1.0)  # 828 B = 6.6 ms, 590 B = 4.7 ms: 7.8 vs 6.1 vs 10 ms local
    best = plan(_opts(), slow)
    assert (best.option.cut, best.option.codec) == ("m@pool2", "int8")
    assert best.latency_ms == pytest.approx(0.3 + 0.1 + 590 * 8 / 1e6 * 1e3 + 1.0)
    assert plan(_opts(), LinkProfile("dead", 1e3, 500.0)).option.cut == OUTPUT


def test_accuracy_floor_and_bytes_objective():
    slow = LinkProfile("slow", 1e6, 1.0)
    assert plan(_opts(), slow, accuracy_floor=0.992).option.codec == "float32"
    assert plan(_opts(), slow, objective="bytes").option.cut == OUTPUT
    assert plan(_opts()[:3], slow, objective="bytes").option.codec == "int8"
    with pytest.raises(NoFeasiblePlan, match="accuracy floor 0.999"):
        plan(_opts(), slow, accuracy_floor=0.999)
    with pytest.raises(ValueError, match="unknown objective 'energy'"):
        plan(_opts(), slow, objective="energy")


def test_unknown_accuracy_never_meets_a_floor():
    opts = [Option("m@fc1", "int8", 0.0, 0.0, 10, None), Option(INPUT, "raw", 0.0, 1.0, 828, 0.99)]
    link = LinkProfile("l", 1e9, 0.0)
    assert plan(opts, link).option.cut == "m@fc1"
    assert plan(opts, link, accuracy_floor=0.9).option.cut == INPUT


def test_options_from_a_profiled_manifest():
    manifest = {
        "model": "m", "profile_batches": [1, 32], "accuracy": {"val": 0.99, "test": 0.993},
        "input": {"raw_frame_bytes": 828},
        "whole_ms": {"onnx": {"1": 0.1, "32": 1.0}, "qcnn": {"1": 0.06, "32": 1.5}},
        "cuts": [{"id": "m@pool2", "codecs": {"float32": {"frame_bytes": 2122}, "int8": {"frame_bytes": 590}},
                  "accuracy": {"int8": {"val": 0.988, "test": 0.99}},
                  "profile": {"qcnn": {"head_ms": {"1": 0.05, "32": 1.2}, "tail_ms": {"1": 0.01, "32": 0.2}},
                              "onnx": {"head_ms": {"1": 0.08, "32": 0.9}, "tail_ms": {"1": 0.02, "32": 0.1}}}}],
    }
    opts = options_from_manifest(manifest, TierProfile("device", "qcnn", 1), TierProfile("edge", "onnx", 32))
    assert opts == [Option(INPUT, "raw", 0.0, 1.0, 828, 0.99), Option("m@pool2", "float32", 0.05, 0.1, 2122, 0.99),
                    Option("m@pool2", "int8", 0.05, 0.1, 590, 0.988), Option(OUTPUT, "", 0.06, 0.0, 0, 0.99)]
    with pytest.raises(ValueError, match="no whole-model latency for runtime 'onnx' at batch 8"):
        options_from_manifest(manifest, TierProfile("device", "qcnn", 1), TierProfile("edge", "onnx", 8))


def test_links_from_config_overrides_and_adds():
    links = links_from_config({"wifi": {"rtt_ms": 2}, "site": {"bandwidth_bps": 2e6, "rtt_ms": 30}})
    assert links["wifi"] == LinkProfile("wifi", KNOWN_LINKS["wifi"].bandwidth_bps, 2.0)
    assert links["site"] == LinkProfile("site", 2e6, 30.0)
    assert links["lte"] == KNOWN_LINKS["lte"]
    with pytest.raises(ValueError, match="new link x needs bandwidth_bps and rtt_ms"):
        links_from_config({"x": {"rtt_ms": 1}})
    with pytest.raises(ValueError, match=r"unknown fields \['latency'\]"):
        links_from_config({"wifi": {"latency": 1}})
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="bandwidth must be finite and > 0"):
            LinkProfile("b", bad, 1.0)
    with pytest.raises(ValueError, match="RTT must be finite and >= 0"):
        LinkProfile("b", 1e6, -1.0)
    assert LinkProfile("l", 8e6, 0).transfer_ms(1000) == pytest.approx(1.0)


def test_brute_force_reference_on_a_hand_counted_case():
    """The reference agrees with costs counted by hand, so the property test compares against something real."""
    cuts = [(1, dict.fromkeys(CODECS, (100, 0.99)))]
    slow = LinkProfile("l", 8e5, 0.0)  # 100 B = 1 ms, 828 B = 8.28 ms
    assert brute_force([1.0, 1.0], [1.0, 1.0], cuts, slow, 0.99, "latency", None, None) == (2.0, 0)  # all local
    fast = LinkProfile("f", 8e7, 0.0)  # 828 B = 0.0828 ms
    assert brute_force([1.0, 1.0], [0.1, 0.1], cuts, fast, 0.99, "latency", None, None) == \
        pytest.approx((0.2828, 828))  # all upstairs
    assert brute_force([1.0, 1.0], [0.1, 0.1], cuts, fast, 0.99, "latency", 0.995, None) is None
