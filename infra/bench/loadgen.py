"""Load for `edgeq bench pipeline`: publisher processes, plain paho sink processes, CPU and memory of the run.

- :class:`PublisherPool`: P processes, each running its share of the devices
  with the project's own `publishers.device.Device` (one paho client and
  thread per device), so one Python process is not the limit of the offered
  load. Each phase gets fresh device ids, so (device, seq) is unique per run.
- :class:`Sink`: a process with one plain paho client that only records what
  arrives: for frames (the ceiling's subscribers) arrival time and the
  header's capture time; for results (edgeq's consumer) arrival time and the
  raw message, decoded after the phase.
- :class:`ProcessTree`: CPU seconds and resident memory of this process and
  every descendant (Mosquitto, publishers, sinks, Ray's processes and actors),
  read from /proc, so other users of a shared machine are not counted; also
  CPU seconds per process group (publishers, sink, broker, edge and cloud
  actors, the rest of Ray, the driver).
- :func:`pin_plan`: which CPUs the load generator (publishers, sink) and the
  pipeline get when the bench pins them (`os.sched_setaffinity`).

Processes are started with `spawn`: the driver may hold Ray and paho threads.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_CTX = mp.get_context("spawn")
CAPTURE = struct.Struct("<q")  # publishers.wire header: capture time (ns) at offset 24
CAPTURE_OFFSET = 24
REPLY_TIMEOUT_S = 120.0


class LoadError(RuntimeError):
    """A publisher or sink process failed or did not answer in time."""


def _reply(conn, proc, what: str, timeout: float = REPLY_TIMEOUT_S):
    """The next message from a child process; LoadError if it died, timed out or reported an error."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.2):
        if not proc.is_alive():
            raise LoadError(f"{what}: process {proc.name} exited with code {proc.exitcode}")
        if time.monotonic() > deadline:
            raise LoadError(f"{what}: no answer after {timeout:.0f}s")
    out = conn.recv()
    if isinstance(out, dict) and "error" in out:
        raise LoadError(f"{what}: {out['error']}")
    return out


# ------------------------------------------------------------------ publishers

@dataclass(frozen=True)
class PhaseReport:
    """What the publishers did in one phase, summed over processes."""

    sent: int
    acked: int
    bytes_sent: int
    dropped: int
    seconds: float
    window_frames: int = 0  # frames the devices generated between `window` start and end


def _pin(cpus) -> None:
    """Run this process on `cpus` only (None: leave it where it is)."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def pin_plan(spec: str, usable: set[int] | None = None) -> tuple[set[int], set[int]] | None:
    """(load generator CPUs, pipeline CPUs) for `--pin-load`, or None for no pinning.

    spec: "off"; "auto" = the last usable CPU for the load generator and the others for the pipeline when
    there are at least 4 usable CPUs (on fewer, one core is too large a share to take from the pipeline, so
    nothing is pinned); or a comma-separated CPU list for the load generator ("3", "2,3"), the pipeline
    getting the rest. Raises ValueError for a list that leaves the pipeline no CPU or names an unusable one.
    """
    usable = set(os.sched_getaffinity(0)) if usable is None else set(usable)
    if spec == "off":
        return None
    if spec == "auto":
        if len(usable) < 4:
            return None
        load = {max(usable)}
    else:
        try:
            load = {int(c) for c in spec.split(",") if c.strip()}
        except ValueError as err:
            raise ValueError(f"--pin-load takes off, auto or a CPU list like 3 or 2,3; got {spec!r}") from err
        if not load or not load <= usable or load == usable:
            raise ValueError(f"--pin-load {spec!r}: CPUs must be some, not all, of the usable {sorted(usable)}")
    return load, usable - load


def _publisher_main(conn, mqtt_cfg, pub_cfg, indices: list[int], cpus=None) -> None:
    """Process body: load the replay data once, then run one phase per command until told to stop."""
    _pin(cpus)
    from publishers.device import Device
    from publishers.run import run_devices
    from publishers.sources import load_replay_data, make_source

    logging.basicConfig(level=logging.WARNING)
    data = load_replay_data(pub_cfg)
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        try:
            cfg = dataclasses.replace(pub_cfg, device_prefix=cmd["prefix"], rate_hz=cmd["rate_hz"],
                                      duration_s=cmd["duration_s"], count=0)
            seeds = np.random.SeedSequence(cfg.seed).spawn(cfg.devices)
            devices = [Device(f"{cfg.device_prefix}{i}", make_source(cfg, i, data), mqtt_cfg, cfg,
                              np.random.default_rng(seeds[i])) for i in indices]
            t0 = time.monotonic()
            out: list = []
            runner = threading.Thread(target=lambda out=out, devices=devices: out.append(run_devices(devices)),
                                      daemon=True)
            runner.start()
            counts = []
            for at in cmd["window"]:  # count the frames generated between these two instants (s after start)
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                counts.append(sum(d.stats.generated for d in devices))
            runner.join()
            if not out:
                raise RuntimeError("devices failed (see the publisher's log)")
            report = out[0]
            conn.send({"sent": report.total("sent"), "acked": report.total("acked"),
                       "bytes_sent": report.total("bytes_sent"), "dropped": sum(report.dropped.values()),
                       "seconds": report.seconds, "window_frames": counts[1] - counts[0]})
        except Exception as err:  # reported to the driver, which raises LoadError
            conn.send({"error": f"{type(err).__name__}: {err}"})


class PublisherPool:
    """`processes` publisher processes sharing `pub_cfg.devices` devices (round robin), on `cpus` if given."""

    def __init__(self, mqtt_cfg, pub_cfg, processes: int, cpus=None):
        if processes < 1 or pub_cfg.devices < processes:
            raise ValueError(f"need 1 <= publisher processes <= devices, got {processes} for {pub_cfg.devices}")
        self.devices = pub_cfg.devices
        self._conns, self._procs = [], []
        for j in range(processes):
            parent, child = _CTX.Pipe()
            indices = list(range(j, pub_cfg.devices, processes))
            p = _CTX.Process(target=_publisher_main, args=(child, mqtt_cfg, pub_cfg, indices, cpus),
                             name=f"edgeq-bench-pub{j}", daemon=True)
            p.start()
            self._conns.append(parent)
            self._procs.append(p)
        for j, (c, p) in enumerate(zip(self._conns, self._procs, strict=True)):
            _reply(c, p, f"publisher process {j} start")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def run(self, prefix: str, total_rate: float, duration_s: float, warmup_s: float = 0.0) -> PhaseReport:
        """Offer `total_rate` frames/s (0 = as fast as the broker acknowledges) for `duration_s`; wait for the end.

        PhaseReport.window_frames counts the frames generated from `warmup_s` to `duration_s` after the start.
        """
        per_device = total_rate / self.devices if total_rate > 0 else 0.0
        for c in self._conns:
            c.send({"prefix": prefix, "rate_hz": per_device, "duration_s": duration_s,
                    "window": (warmup_s, duration_s)})
        outs = [_reply(c, p, f"publisher process {j} phase {prefix}", duration_s + REPLY_TIMEOUT_S)
                for j, (c, p) in enumerate(zip(self._conns, self._procs, strict=True))]
        return PhaseReport(*(sum(o[k] for o in outs) for k in ("sent", "acked", "bytes_sent", "dropped")),
                           seconds=max(o["seconds"] for o in outs),
                           window_frames=sum(o["window_frames"] for o in outs))

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


# ------------------------------------------------------------------ sinks

def _sink_main(conn, mqtt_cfg, topic_filter: str, client_id: str, frames: bool, cpus=None) -> None:
    """Process body: subscribe, record every message from paho's thread, hand the records over on request."""
    _pin(cpus)
    from publishers import mqtt as mqttlib

    arrivals: list[int] = []
    extra: list = []  # capture_ns (frames) or raw payloads (results)
    nbytes = [0]
    subscribed = threading.Event()

    def record(payload: bytes) -> None:
        arrivals.append(time.time_ns())
        nbytes[0] += len(payload)
        if frames:
            extra.append(CAPTURE.unpack_from(payload, CAPTURE_OFFSET)[0] if len(payload) >= 32 else 0)
        else:
            extra.append(payload)

    if frames:  # the ceiling's subscribers: plain paho, its network thread calling on_message
        client = mqttlib.make_client(mqtt_cfg, client_id)
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic_filter, qos=mqtt_cfg.qos)
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_message = lambda c, u, msg: record(msg.payload)
        mqttlib.start(client, mqtt_cfg)

        def stop() -> None:
            client.disconnect()
            client.loop_stop()
    else:  # edgeq's results consumer: the edge's own reader (see _results_reader), so it takes less CPU
        stop = _results_reader(mqtt_cfg, topic_filter, client_id, record, subscribed)
    conn.send("ready" if subscribed.wait(30) else {"error": f"not subscribed to {topic_filter} after 30s"})
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        n = len(arrivals)  # the network thread only appends: take a consistent prefix, keep the rest
        out = {"arrival_ns": arrivals[:n], "extra": extra[:n], "bytes": nbytes[0]}
        del arrivals[:n], extra[:n]
        nbytes[0] = 0
        conn.send(out)
    stop()


def _results_reader(mqtt_cfg, topic_filter: str, client_id: str, record, subscribed: threading.Event):
    """A thread taking results with edge_workers.ingest.DrivenSubscriber; returns a function that stops it.

    The results consumer shares the 2 cores with the pipeline it measures: with paho's own loop it took
    about 110 us of CPU per result message (issue 7), which the edge and the broker then lacked. The
    ceiling's subscribers stay plain paho, as the benchmark defines them.
    """
    from edge_workers.ingest import DrivenSubscriber

    sub = DrivenSubscriber(mqtt_cfg, client_id, topic_filter).start()
    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            for msg in sub.get_batch(1024, 0.05):
                record(msg.payload)
            if sub.subacks:
                subscribed.set()
        sub.stop()

    thread = threading.Thread(target=run, name="results-reader", daemon=True)
    thread.start()
    return lambda: (done.set(), thread.join(timeout=10))


class Sink:
    """A subscriber in its own process (on `cpus` if given) that records arrivals (frames: capture times too)."""

    def __init__(self, mqtt_cfg, topic_filter: str, client_id: str, frames: bool, cpus=None):
        self._conn, child = _CTX.Pipe()
        self._proc = _CTX.Process(target=_sink_main, args=(child, mqtt_cfg, topic_filter, client_id, frames, cpus),
                                  name=client_id, daemon=True)
        self._proc.start()
        _reply(self._conn, self._proc, f"sink {client_id} start")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def take(self) -> tuple[np.ndarray, list, int]:
        """Everything recorded since the last call: (arrival_ns int64 [n], capture_ns or payloads, bytes)."""
        self._conn.send("take")
        out = _reply(self._conn, self._proc, "sink take")
        return np.asarray(out["arrival_ns"], dtype=np.int64), out["extra"], out["bytes"]

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()


# ------------------------------------------------------------------ resources

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_stats() -> dict[int, tuple[int, float, int]]:
    """pid -> (ppid, cpu seconds user+system, rss bytes) for every readable process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK, int(fields[21]) * _PAGE)
    return out


def descendants(root: int, stats: dict[int, tuple[int, float, int]]) -> set[int]:
    """`root` and every process below it, in `stats` (from `proc_stats`)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = {root}, [root]
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def process_group(pid: int) -> str:
    """What a process of the bench's tree is, from its command line: mosquitto, edge actor, cloud actor, or
    the rest of Ray (GCS, raylet, idle workers, agents) and anything else."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    first = cmd[0].decode(errors="replace") if cmd else ""
    if first.rsplit("/", 1)[-1] == "mosquitto":
        return "mosquitto"
    if first.startswith("ray::EdgeWorker"):
        return "edge actors"
    if first.startswith("ray::CloudWorker"):
        return "cloud actors"
    return "ray, other"


class ProcessTree:
    """CPU seconds and peak summed RSS of this process and its descendants, minus `exclude` pids; and CPU
    seconds per process group of the whole tree, excluded pids too (`cpu_by_group`).

    Sampled every `interval_s` by a thread between `start()` and `stop()`;
    CPU of a process that exits between samples counts up to its last sample.
    roles: pid -> group name for processes known by pid (the driver, publishers, sinks; the children of
    publishers and sinks inherit it); every other process is grouped by `process_group`.
    """

    def __init__(self, exclude: tuple[int, ...] = (), interval_s: float = 1.0, roles: dict[int, str] | None = None):
        self.exclude, self.interval_s = set(exclude), interval_s
        self.roles = dict(roles or {})
        self._first: dict[int, float] = {}
        self._baseline = True
        self._last: dict[int, float] = {}
        self._group: dict[int, str] = {}
        self.peak_rss = 0
        self.cpu_by_group: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-tree", daemon=True)

    def _group_of(self, pid: int, stats) -> str:
        group = self._group.get(pid)
        if group is None:
            p, seen, me = pid, 0, os.getpid()
            while p in stats and p not in self.roles and p != me and seen < 64:  # up to a process of known role
                p, seen = stats[p][0], seen + 1
            # The driver's role is its own: what it started (broker, Ray) is grouped by what it is.
            role = self.roles.get(p) if p == pid or p != me else None
            group = self._group[pid] = role or process_group(pid)
        return group

    def _sample(self) -> None:
        stats = proc_stats()
        pids = descendants(os.getpid(), stats)
        rss = 0
        for pid in pids:
            _, cpu, r = stats[pid]
            self._first.setdefault(pid, cpu if self._baseline else 0.0)
            self._last[pid] = cpu
            self._group_of(pid, stats)
            if pid not in self.exclude:
                rss += r
        self.peak_rss = max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> ProcessTree:
        self._sample()  # baseline: processes alive now count from here; later ones from 0
        self._baseline = False
        self._thread.start()
        return self

    def stop(self) -> tuple[float, int]:
        """(cpu seconds of the pids not excluded, peak rss bytes) since start; fills `cpu_by_group`."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        used = {p: self._last[p] - self._first.get(p, 0.0) for p in self._last}
        self.cpu_by_group = {}
        for pid, cpu in used.items():
            g = self._group[pid]
            self.cpu_by_group[g] = self.cpu_by_group.get(g, 0.0) + cpu
        return sum(cpu for p, cpu in used.items() if p not in self.exclude), self.peak_rss
