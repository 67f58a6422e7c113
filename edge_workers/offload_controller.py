"""Adaptive offload controller: the confidence threshold and the split, adjusted per control tick
under uplink/p99 budgets.

Pure and deterministic: no threads, no clock; the caller passes the time and the measurements of
each control tick (``OffloadController.tick``) and applies the returned ``Decision``.

What is controlled. With confidence routing a frame whose confidence (1 - normalised entropy,
``edge_workers.routing``) is **below** the threshold is offloaded; the others are answered at the
edge. So a LOWER threshold offloads FEWER frames: less uplink, lower p99 (an offloaded frame always
takes longer than an edge answer, it is classified at the edge first), less accuracy (the cloud is
right more often on the uncertain frames). The split (a planner ``Option``) is how an offloaded frame
crosses: ``input`` = today's uplink codec payload, a cut = the head of the upper model runs at the
edge and its tensor crosses, ``output`` = the upper model runs at the edge, nothing crosses. Mode
``edge-only`` offloads nothing whatever the threshold (the fallback when the cloud is unreachable).

Budgets. ``uplink_budget_kbps`` caps the offload payload rate on the hop (kbit/s, 1 kbit = 1000 bit,
measured as bytes/s over the caller's window); ``p99_budget_ms`` caps the end-to-end p99 over the
window. The utilisation is u = max(uplink / budget, p99 / budget) over the budgets set and measured.
u > 1 is over budget: the threshold moves down. u < ``low_water`` is underused: it moves up, never
above ``threshold_max`` (the configured threshold: the controller never offloads more than the
operator asked). In between it holds (hysteresis).

Search and its bound. The controller keeps a bracket [lo, hi] of thresholds (lo: last measured
underused, hi: last measured over budget; initially threshold_min, threshold_max) and moves from its
end toward the other by d = min(width / 2, max_step), so no move is larger than ``max_step``. Each
move shrinks the bracket by at least d; the search stops when width <= ``resolution`` (jumping to lo
if it is over budget there). On a plant whose uplink and p99 do not decrease with the threshold, it
therefore settles after at most ``convergence_bound(config)`` changes (one split change plus the
threshold moves), i.e. within ``convergence_bound * (min_period_s + tick)`` seconds of the last plant
change. A measurement that contradicts the bracket (over budget at or below lo) resets it, and hi is
forgotten after ``reprobe_after_s`` so an eased plant is found again.

Dwell. No decision changes within ``min_period_s`` of the previous change, except the fallback to
edge-only, which is immediate (``fail_after`` consecutive failed cloud calls or probes); leaving
edge-only waits for the dwell and ``recover_ticks`` healthy ticks and restores the threshold and
split held before. So a full cycle (change, change back) never takes less than ``min_period_s``.
Measurements should cover a window no longer than ``min_period_s``, so each decision sees only
traffic from after the previous change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from edge_workers.split_planner import (
    NoFeasiblePlan,
    Option,
    expected_latency_ms,
    feasible,
    plan,
)
from modelstore.profiles import LinkProfile

OFFLOAD, EDGE_ONLY = "offload", "edge-only"
# Every reason a tick can report (bounded: these are metric label values).
REASONS = ("initial", "over_budget", "under_budget", "in_band", "converged", "saturated_low", "saturated_high",
           "no_budget", "no_data", "dwell", "split_changed", "cloud_unreachable", "cloud_recovered", "edge_only")


@dataclass(frozen=True)
class ControllerConfig:
    """Budgets and control parameters; times in seconds, thresholds in confidence units [0, 1]."""

    uplink_budget_kbps: float | None = None  # offload payload on the hop, kbit/s; None: no uplink budget
    p99_budget_ms: float | None = None       # end-to-end p99, ms; None: no latency budget
    threshold_max: float = 0.9               # the configured threshold: the most the controller offloads
    threshold_min: float = 0.0               # 0 offloads nothing
    max_step: float = 0.1                    # largest threshold move per change
    resolution: float = 0.01                 # bracket width at which the search stops
    low_water: float = 0.8                   # utilisation below this is underused
    min_period_s: float = 5.0                # dwell: no two changes closer than this (fallback excepted)
    switch_margin: float = 0.1               # a new split must be predicted this much faster (relative)
    fail_after: int = 3                      # consecutive cloud failures that mean "unreachable"
    recover_ticks: int = 3                   # healthy ticks before leaving edge-only
    reprobe_after_s: float | None = 60.0     # forget hi after this long; None: never
    accuracy_floor: float | None = None      # planner: options below it (validation accuracy) are not chosen

    def __post_init__(self):
        for name in ("uplink_budget_kbps", "p99_budget_ms"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be finite and > 0 (or None), got {v!r}")
        if not 0.0 <= self.threshold_min <= self.threshold_max <= 1.0:
            raise ValueError(f"need 0 <= threshold_min <= threshold_max <= 1, got {self.threshold_min!r}, "
                             f"{self.threshold_max!r}")
        if not 0 < self.resolution <= self.max_step:
            raise ValueError(f"need 0 < resolution <= max_step, got {self.resolution!r}, {self.max_step!r}")
        if not 0 < self.low_water < 1:
            raise ValueError(f"low_water must be in (0, 1), got {self.low_water!r}")
        if not (self.min_period_s >= 0 and math.isfinite(self.min_period_s)):
            raise ValueError(f"min_period_s must be finite and >= 0, got {self.min_period_s!r}")
        if not 0 <= self.switch_margin < 1:
            raise ValueError(f"switch_margin must be in [0, 1), got {self.switch_margin!r}")
        if self.fail_after < 1 or self.recover_ticks < 1:
            raise ValueError(f"fail_after and recover_ticks must be >= 1, got {self.fail_after}, {self.recover_ticks}")
        if self.reprobe_after_s is not None and not self.reprobe_after_s > self.min_period_s:
            raise ValueError(f"reprobe_after_s must exceed min_period_s {self.min_period_s}, "
                             f"got {self.reprobe_after_s!r}")

    @property
    def uplink_budget_bytes_per_s(self) -> float | None:
        return None if self.uplink_budget_kbps is None else self.uplink_budget_kbps * 1000.0 / 8.0


def convergence_bound(config: ControllerConfig) -> int:
    """Most decision changes before the controller settles on a stationary monotone plant (one split change,
    the threshold moves while the bracket is wider than 2·max_step, the halvings down to the resolution, the
    final jump to lo)."""
    span, step, res = config.threshold_max - config.threshold_min, config.max_step, config.resolution
    wide = math.ceil(max(span - 2 * step, 0.0) / step - 1e-9)
    narrow = math.ceil(math.log2(min(span, 2 * step) / res) - 1e-9) if min(span, 2 * step) > res else 0
    return 1 + wide + narrow + 1


@dataclass(frozen=True)
class Measurement:
    """One control tick. t_s: caller's monotonic time, s; uplink_bytes_per_s: offload payload rate over the
    window; p99_ms: end-to-end p99 over the window (None: no frames); cloud_failures: consecutive failed or
    timed-out cloud calls or probes at tick time (0 after a success); link: current link estimate."""

    t_s: float
    uplink_bytes_per_s: float | None = None
    p99_ms: float | None = None
    cloud_failures: int = 0
    link: LinkProfile | None = None


@dataclass(frozen=True)
class Decision:
    """What the pipeline applies: mode (OFFLOAD or EDGE_ONLY), threshold (offload frames with confidence
    below it; kept, not applied, in EDGE_ONLY), option (how an offloaded frame crosses; None: the worker's
    configured uplink codec), why, whether this tick changed anything, the planner's predicted ms."""

    mode: str
    threshold: float
    option: Option | None
    reason: str
    changed: bool = False
    predicted_ms: float | None = None


@dataclass
class _Bracket:
    lo: float
    hi: float
    hi_t: float | None = None  # when hi was last measured over budget


@dataclass
class OffloadController:
    """Feed ``tick(Measurement)`` every control period; see the module docstring for the rules."""

    config: ControllerConfig = field(default_factory=ControllerConfig)
    options: Sequence[Option] = ()
    option: Option | None = None  # initial split; default: the planner's choice at the first tick with a link

    def __post_init__(self):
        cfg = self.config
        self._decision = Decision(OFFLOAD, cfg.threshold_max, self.option, "initial")
        self._bracket = _Bracket(cfg.threshold_min, cfg.threshold_max)
        self._changed_t: float | None = None
        self._last_t: float | None = None
        self._healthy = 0
        self._before_fallback: Decision | None = None
        self._link: LinkProfile | None = None
        self._options = list(self.options)

    @property
    def decision(self) -> Decision:
        return self._decision

    def utilisation(self, m: Measurement) -> float | None:
        """max(uplink / budget, p99 / budget) over the budgets set and measured; None if there is none."""
        cfg, terms = self.config, []
        if cfg.uplink_budget_bytes_per_s is not None and m.uplink_bytes_per_s is not None:
            terms.append(m.uplink_bytes_per_s / cfg.uplink_budget_bytes_per_s)
        if cfg.p99_budget_ms is not None and m.p99_ms is not None:
            terms.append(m.p99_ms / cfg.p99_budget_ms)
        return max(terms) if terms else None

    def tick(self, m: Measurement) -> Decision:
        """One control step at time m.t_s (non-decreasing); returns the decision to apply from now on."""
        if not math.isfinite(m.t_s) or (self._last_t is not None and m.t_s < self._last_t):
            raise ValueError(f"tick time must be finite and non-decreasing: got {m.t_s!r} after {self._last_t!r}")
        if m.cloud_failures < 0:
            raise ValueError(f"cloud_failures must be >= 0, got {m.cloud_failures}")
        self._last_t = m.t_s
        if m.link is not None:
            self._link = m.link
        self._decision = self._step(m)
        return self._decision

    # --- the rules, in priority order -------------------------------------------------------------------

    def _step(self, m: Measurement) -> Decision:
        cfg, cur = self.config, self._decision
        if m.cloud_failures >= cfg.fail_after:
            self._healthy = 0
            if cur.mode == EDGE_ONLY:
                return self._hold("cloud_unreachable")
            self._before_fallback = cur
            return self._change(m.t_s, replace(cur, mode=EDGE_ONLY), "cloud_unreachable")
        self._healthy += 1
        dwell_ok = self._changed_t is None or m.t_s - self._changed_t >= cfg.min_period_s
        if cur.mode == EDGE_ONLY:
            if self._healthy >= cfg.recover_ticks and dwell_ok:
                back = self._before_fallback or cur
                self._reset_bracket()
                return self._change(m.t_s, replace(back, mode=OFFLOAD), "cloud_recovered")
            return self._hold("edge_only")
        if not dwell_ok:
            return self._hold("dwell")
        better = self._better_split()
        if better is not None:
            self._reset_bracket()
            return self._change(m.t_s, replace(cur, option=better), "split_changed")
        return self._threshold_step(m)

    def _better_split(self) -> Option | None:
        """The planner's choice when it beats the current split by the margin (or the current is infeasible)."""
        if not self._options or self._link is None:
            return None
        try:
            best = plan(self._options, self._link, accuracy_floor=self.config.accuracy_floor)
        except NoFeasiblePlan:
            return None
        cur = self._decision.option
        if cur is None or not feasible(cur, self.config.accuracy_floor):
            return best.option if best.option != cur else None
        if best.option == cur:
            return None
        cur_ms = expected_latency_ms(cur, self._link)
        return best.option if best.latency_ms < cur_ms * (1.0 - self.config.switch_margin) else None

    def _threshold_step(self, m: Measurement) -> Decision:
        cfg, b, theta = self.config, self._bracket, self._decision.threshold
        u = self.utilisation(m)
        if u is None:
            return self._hold("no_budget" if cfg.uplink_budget_kbps is None and cfg.p99_budget_ms is None
                              else "no_data")
        if cfg.reprobe_after_s is not None and b.hi_t is not None and m.t_s - b.hi_t >= cfg.reprobe_after_s:
            b.hi, b.hi_t = cfg.threshold_max, None
        if u > 1.0:
            if theta <= cfg.threshold_min:
                return self._hold("saturated_low")
            if theta <= b.lo:  # was underused here: the plant changed
                b.lo = cfg.threshold_min
            b.hi, b.hi_t = theta, m.t_s
            width = b.hi - b.lo
            target = b.lo if width <= cfg.resolution else theta - min(width / 2, cfg.max_step)
            return self._move(m.t_s, target, "over_budget")
        if u < cfg.low_water:
            if theta >= cfg.threshold_max:
                return self._hold("saturated_high")
            b.lo = theta
            if b.hi <= theta:
                b.hi, b.hi_t = cfg.threshold_max, None
            width = b.hi - b.lo
            if width <= cfg.resolution:
                return self._hold("converged")
            return self._move(m.t_s, theta + min(width / 2, cfg.max_step), "under_budget")
        return self._hold("in_band")

    # --- bookkeeping -------------------------------------------------------------------------------------

    def _reset_bracket(self) -> None:
        self._bracket = _Bracket(self.config.threshold_min, self.config.threshold_max)

    def _predicted_ms(self, option: Option | None) -> float | None:
        if option is None or self._link is None:
            return None
        return expected_latency_ms(option, self._link)

    def _hold(self, reason: str) -> Decision:
        cur = self._decision
        return replace(cur, reason=reason, changed=False, predicted_ms=self._predicted_ms(cur.option))

    def _move(self, t_s: float, target: float, reason: str) -> Decision:
        cfg = self.config
        target = min(max(target, cfg.threshold_min), cfg.threshold_max)
        return self._change(t_s, replace(self._decision, threshold=target), reason)

    def _change(self, t_s: float, new: Decision, reason: str) -> Decision:
        self._changed_t = t_s
        return replace(new, reason=reason, changed=True, predicted_ms=self._predicted_ms(new.option))
