"""What one `edgeq bench pipeline` run is: its settings, and the probes and phases measured per mode.

Plain data: the runner (infra.bench.pipeline) fills it in, the report (infra.bench.pipeline_report) reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_workers.config import EdgeConfig
from infra.bench.pipeline_phases import Phase

MODES = ("ceiling", "edgeq", "cloud-only")
SATURATION = "saturation"


@dataclass
class PipelineBenchConfig:
    """Settings of one `edgeq bench pipeline` run (defaults: the full run, ~6 min on a busy 2-core host)."""

    duration_s: float = 15.0      # each latency phase
    probe_s: float = 6.0          # each probe of the saturation search
    start_rate: float = 200.0     # frames/s of the first probe; doubled until a probe is not sustained ...
    bisect: int = 2               # ... then this many geometric bisection probes
    max_probes: int = 12          # bounds the doubling / halving part of the search
    sustain: float = 0.95         # a probe is sustained if answers arrive at >= this fraction of the offered rate
    max_p99_ms: float = 1000.0    # ... and its p99 is below this (no queue building up)
    warmup_s: float = 2.0         # the first seconds of every phase are left out of its statistics
    loads: tuple[float, ...] = (0.25, 0.5, 0.9)  # fractions of edgeq's saturation rate
    devices: int = 8
    publishers: int = 2           # publisher processes sharing the devices
    edge_actors: int = 2          # edge actors, and the ceiling's subscribers
    cloud_actors: int = 1
    batch_max: int = 64
    batch_wait_ms: float = EdgeConfig.batch_wait_ms  # edgeq's default
    qos: int = 1
    noise: str = "none"
    data_dir: str = "data/mnist"
    out_dir: str = "docs/results"  # "" = print only
    drain_timeout_s: float = 60.0  # after a phase, wait at most this long for the last answers
    seed: int = 0

    def __post_init__(self) -> None:
        if self.duration_s <= self.warmup_s or self.probe_s <= self.warmup_s:
            raise ValueError(f"phases must be longer than the warmup ({self.warmup_s}s), got "
                             f"duration {self.duration_s}s, probe {self.probe_s}s")
        if not 0 < self.sustain <= 1:
            raise ValueError(f"sustain must be in (0, 1], got {self.sustain}")
        if self.start_rate <= 0 or self.bisect < 0 or self.max_probes < 1:
            raise ValueError(f"start_rate > 0, bisect >= 0 and max_probes >= 1 required, got {self.start_rate}, "
                             f"{self.bisect}, {self.max_probes}")
        if not self.loads or not all(0 < f <= 1.5 for f in self.loads):
            raise ValueError(f"loads must be fractions in (0, 1.5], got {self.loads}")
        if not 1 <= self.publishers <= self.devices:
            raise ValueError(f"need 1 <= publishers <= devices, got {self.publishers} and {self.devices}")
        if self.qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, got {self.qos}")


@dataclass
class ModeResult:
    """One mode: the saturation search's probes, then the latency phases at fixed loads."""

    mode: str
    detail: str
    probes: list[Phase] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    best: Phase | None = None  # the sustained probe with the highest throughput
    publisher_limited: bool = False  # the search stopped because the devices could not offer more

    @property
    def saturation(self) -> float:
        """Sustained frames/s: the highest throughput of a sustained probe (0 if none was)."""
        return self.best.throughput if self.best else 0.0

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)

    def total(self, attr: str) -> int:
        """Summed over every phase and probe."""
        return sum(getattr(p, attr) for p in self.probes + self.phases)

    @property
    def peak_rss(self) -> int:
        return max((p.peak_rss for p in self.probes + self.phases), default=0)

    @property
    def accuracy(self) -> float | None:
        n = self.total("labelled")
        return self.total("correct") / n if n else None


def load_name(fraction: float) -> str:
    return f"{100 * fraction:g} %"
