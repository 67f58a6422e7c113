"""Link measurement: a hop's RTT and bandwidth estimated from the pipeline's own timed transfers, with config pins.

Pure and clock-free: the caller records one ``Transfer`` per message it times (a cloud call, a
probe, a QoS 1 publish and its PUBACK) and asks for ``estimate(now_s)``. The model of one transfer
is the planner's::

    done_s - sent_s - service_s = rtt + 8 * (nbytes + reply_bytes) / bandwidth (+ queueing >= 0)

``service_s`` is time the far end reports spending before it answered (cloud inference), taken out.
Queueing only ever adds, so the RTT is the minimum net duration of the small transfers (nbytes +
reply_bytes <= ``small_bytes``: probes, acks) in the window, where serialization is negligible, and
each large transfer (>= ``large_bytes``) gives a lower bound 8 * bytes / (net duration - RTT) on
the bandwidth; the estimate is their ``quantile`` (0.9: a high one, since queueing only lowers them,
not the maximum, which one mistimed sample would set). A transfer much shorter than the queueing
jitter says little: on fast links the bandwidth is only as good as large_bytes is large, and it
matters little there, as the planner's transfer term is small. A figure with no sample in the
window comes from the prior (a ``KNOWN_LINKS`` entry or the config); a field given in the config
is pinned and never measured.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelstore.profiles import KNOWN_LINKS, LinkProfile, links_from_config

MEASURED, CONFIG, PRIOR = "measured", "config", "prior"


@dataclass(frozen=True)
class Transfer:
    """One timed message: nbytes sent at sent_s, its answer (reply_bytes) back at done_s, seconds on one
    monotonic clock; service_s: the far end's own time before answering."""

    nbytes: int
    sent_s: float
    done_s: float
    reply_bytes: int = 0
    service_s: float = 0.0

    def __post_init__(self):
        if self.nbytes < 0 or self.reply_bytes < 0:
            raise ValueError(f"transfer bytes must be >= 0, got nbytes={self.nbytes}, reply_bytes={self.reply_bytes}")
        if not (math.isfinite(self.sent_s) and math.isfinite(self.done_s) and self.done_s >= self.sent_s):
            raise ValueError(f"transfer must end at or after it starts: sent_s={self.sent_s!r}, done_s={self.done_s!r}")
        if not 0.0 <= self.service_s <= self.done_s - self.sent_s:
            raise ValueError(f"service_s must be in [0, duration {self.done_s - self.sent_s:.6f}], "
                             f"got {self.service_s!r}")

    @property
    def total_bytes(self) -> int:
        return self.nbytes + self.reply_bytes

    @property
    def net_s(self) -> float:
        """Duration without the far end's service time, seconds."""
        return self.done_s - self.sent_s - self.service_s


@dataclass(frozen=True)
class LinkEstimate:
    """The profile to plan with, where each figure came from (MEASURED, CONFIG or PRIOR), and the samples used."""

    profile: LinkProfile
    bandwidth_source: str
    rtt_source: str
    rtt_samples: int
    bandwidth_samples: int


class LinkEstimator:
    """Windowed estimate of one hop. prior: figures used until measured; pinned: {"bandwidth_bps"|"rtt_ms": value}
    from the config, never measured; window: last samples kept; max_age_s: older ones are ignored; small_bytes,
    large_bytes: transfers (both ways) that time the RTT and the bandwidth; quantile: of the bandwidth bounds."""

    def __init__(self, prior: LinkProfile, pinned: Mapping[str, float] | None = None, window: int = 512,
                 max_age_s: float = 60.0, small_bytes: int = 256, large_bytes: int = 4096, quantile: float = 0.9):
        pinned = dict(pinned or {})
        extra = set(pinned) - {"bandwidth_bps", "rtt_ms"}
        if extra:
            raise ValueError(f"link {prior.name}: unknown pinned fields {sorted(extra)}; known: bandwidth_bps, rtt_ms")
        if window < 1 or not max_age_s > 0 or not 0 <= small_bytes < large_bytes or not 0 < quantile <= 1:
            raise ValueError(f"need window >= 1, max_age_s > 0, 0 <= small_bytes < large_bytes, 0 < quantile <= 1; "
                             f"got {window}, {max_age_s}, {small_bytes}, {large_bytes}, {quantile}")
        self.prior = LinkProfile(prior.name, float(pinned.get("bandwidth_bps", prior.bandwidth_bps)),
                                 float(pinned.get("rtt_ms", prior.rtt_ms)))
        self.pinned = pinned
        self.max_age_s, self.small_bytes, self.large_bytes = max_age_s, small_bytes, large_bytes
        self.quantile = quantile
        self._samples: deque[Transfer] = deque(maxlen=window)

    @classmethod
    def from_config(cls, name: str, links_cfg: Mapping[str, Mapping[str, Any]] | None = None,
                    default: LinkProfile | None = None, **kw) -> LinkEstimator:
        """An estimator for link `name`: fields given in links_cfg (links_from_config's format) are pinned; the
        prior is that config merged over KNOWN_LINKS, else `default`."""
        links = links_from_config(links_cfg)
        if name in links:
            prior = links[name]
        elif default is not None:
            prior = LinkProfile(name, default.bandwidth_bps, default.rtt_ms)
        else:
            raise ValueError(f"link {name!r} is neither configured nor known ({', '.join(KNOWN_LINKS)}); "
                             f"give a default profile")
        pinned = {k: float(v) for k, v in (links_cfg or {}).get(name, {}).items()}
        return cls(prior, pinned, **kw)

    def add(self, sample: Transfer) -> None:
        self._samples.append(sample)

    def estimate(self, now_s: float) -> LinkEstimate:
        """Figures from the samples that ended within max_age_s of now_s (seconds, the samples' clock).

        Two passes: the RTT from the small transfers' raw minimum gives a bandwidth, which then takes the
        small transfers' own serialization out of the RTT, and the bandwidth is taken again."""
        recent = [s for s in self._samples if now_s - s.done_s <= self.max_age_s]
        small = [s for s in recent if s.total_bytes <= self.small_bytes]
        large = [s for s in recent if s.total_bytes >= self.large_bytes]
        bw, bw_src, n_rates = self._bandwidth(large, self._rtt_s(small, None))
        rtt_s = self._rtt_s(small, bw)
        bw, bw_src, n_rates = self._bandwidth(large, rtt_s)
        rtt_src = CONFIG if "rtt_ms" in self.pinned else MEASURED if small else PRIOR
        return LinkEstimate(LinkProfile(self.prior.name, bw, rtt_s * 1e3), bw_src, rtt_src, len(small), n_rates)

    def _rtt_s(self, small: list[Transfer], bandwidth_bps: float | None) -> float:
        if "rtt_ms" in self.pinned or not small:
            return self.prior.rtt_ms / 1e3
        serial = (lambda s: 8.0 * s.total_bytes / bandwidth_bps) if bandwidth_bps else (lambda s: 0.0)
        return max(min(s.net_s - serial(s) for s in small), 0.0)

    def _bandwidth(self, large: list[Transfer], rtt_s: float) -> tuple[float, str, int]:
        rates = [8.0 * s.total_bytes / (s.net_s - rtt_s) for s in large if s.net_s > rtt_s]
        if "bandwidth_bps" in self.pinned:
            return self.prior.bandwidth_bps, CONFIG, len(rates)
        if rates:
            rates.sort()
            return rates[min(int(self.quantile * len(rates)), len(rates) - 1)], MEASURED, len(rates)
        return self.prior.bandwidth_bps, PRIOR, 0
