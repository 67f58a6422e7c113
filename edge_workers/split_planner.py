"""Split planner: the cut and codec minimising expected end-to-end latency (or bytes) under measured profiles.

Two tiers joined by one link (device -> edge, or edge -> cloud). An ``Option`` is one way to answer a
frame: the lower tier runs the head up to a cut, the cut's tensor crosses the link with a codec, the
upper tier runs the tail. Two options need no partition: ``input`` (the raw frame crosses, the upper
tier runs the whole model) and ``output`` (the lower tier runs it all, nothing crosses). Expected
latency of an option (Neurosurgeon's model, Kang et al. ASPLOS 2017)::

    lower_ms + upper_ms + (bytes * 8 / bandwidth + rtt   if anything crosses, else 0)

where lower_ms/upper_ms are the measured per-call times of the head/tail on each tier's runtime
at its typical batch, and the RTT counts the tensor's way up and the result's way back. ``plan``
filters options by an accuracy floor (and optionally a bytes budget), then takes the minimum of the
objective, ties broken by the other objective, then higher accuracy, then option order. Pure and
numpy-free; ``options_from_manifest`` builds the options from a profiled partition manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from modelstore.profiles import LinkProfile, TierProfile

logger = logging.getLogger(__name__)

OBJECTIVES = ("latency", "bytes")
INPUT, OUTPUT = "input", "output"


class NoFeasiblePlan(ValueError):
    """No option meets the accuracy floor and the bytes budget."""


@dataclass(frozen=True)
class Option:
    """One (cut, codec) choice. cut: a cut id, INPUT or OUTPUT; bytes: per frame on the link (0 with OUTPUT);
    lower_ms, upper_ms: compute per call on each tier; accuracy: fraction in [0, 1], None when unknown."""

    cut: str
    codec: str
    lower_ms: float
    upper_ms: float
    bytes: int
    accuracy: float | None = None

    @property
    def crosses(self) -> bool:
        return self.cut != OUTPUT


@dataclass(frozen=True)
class Plan:
    """The chosen option and its expected latency (ms) and bytes per frame."""

    option: Option
    latency_ms: float
    bytes: int


def expected_latency_ms(option: Option, link: LinkProfile) -> float:
    """Expected end-to-end latency of one frame under `option` over `link`, milliseconds."""
    hop = link.transfer_ms(option.bytes) + link.rtt_ms if option.crosses else 0.0
    return option.lower_ms + hop + option.upper_ms


def feasible(option: Option, accuracy_floor: float | None = None, max_bytes: int | None = None) -> bool:
    """Whether `option` meets the floor (unknown accuracy never does) and the budget."""
    if accuracy_floor is not None and (option.accuracy is None or option.accuracy < accuracy_floor):
        return False
    return max_bytes is None or option.bytes <= max_bytes


def plan(options: Sequence[Option], link: LinkProfile, objective: str = "latency",
         accuracy_floor: float | None = None, max_bytes: int | None = None) -> Plan:
    """The best feasible option; NoFeasiblePlan when none is, ValueError on an unknown objective."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    best, best_key = None, None
    for i, opt in enumerate(options):
        if not feasible(opt, accuracy_floor, max_bytes):
            continue
        latency = expected_latency_ms(opt, link)
        cost = (latency, opt.bytes) if objective == "latency" else (opt.bytes, latency)
        key = (*cost, -(opt.accuracy if opt.accuracy is not None else -1.0), i)
        if best_key is None or key < best_key:
            best, best_key = Plan(opt, latency, opt.bytes), key
    if best is None:
        raise NoFeasiblePlan(f"none of {len(options)} options meets accuracy floor {accuracy_floor} "
                             f"and bytes budget {max_bytes}")
    logger.debug("split plan over %s: %s %s, %.3f ms, %d B", link.name, best.option.cut, best.option.codec,
                 best.latency_ms, best.bytes)
    return best


def options_from_manifest(manifest: dict, lower: TierProfile, upper: TierProfile, accuracy_split: str = "val",
                          ends: bool = True) -> list[Option]:
    """Options from a partition manifest profiled on both tiers' runtimes at their batches (modelstore.profiles)
    and evaluated on `accuracy_split` (modelstore.partition_eval). Bytes are whole tensor frames.

    ends: also the INPUT (raw frame crosses) and OUTPUT (nothing crosses) options.
    """
    def ms(table: dict, tier: TierProfile, what: str) -> float:
        try:
            return float(table[tier.runtime][str(tier.batch)])
        except KeyError:
            raise ValueError(f"{manifest['model']}: no {what} latency for runtime {tier.runtime!r} at batch "
                             f"{tier.batch} (profiled: {sorted(table)} at {manifest.get('profile_batches')})") from None

    whole_acc = manifest.get("accuracy", {}).get(accuracy_split)
    opts = []
    if ends:
        opts.append(Option(INPUT, "raw", 0.0, ms(manifest["whole_ms"], upper, "whole-model"),
                           int(manifest["input"]["raw_frame_bytes"]), whole_acc))
    for cut in manifest["cuts"]:
        prof = cut.get("profile", {})
        head = ms({k: v["head_ms"] for k, v in prof.items()}, lower, f"{cut['id']} head")
        tail = ms({k: v["tail_ms"] for k, v in prof.items()}, upper, f"{cut['id']} tail")
        for codec, size in cut["codecs"].items():
            acc = cut.get("accuracy", {}).get(codec, {}).get(accuracy_split)
            if acc is None and codec == "float32":
                acc = whole_acc  # lossless: the whole model's (round trip tested to 1e-5)
            opts.append(Option(cut["id"], codec, head, tail, int(size["frame_bytes"]), acc))
    if ends:
        opts.append(Option(OUTPUT, "", ms(manifest["whole_ms"], lower, "whole-model"), 0.0, 0, whole_acc))
    return opts
