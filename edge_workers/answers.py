"""Result messages of a group of answered frames: one per device, whoever publishes them (edge or cloud actor)."""

from __future__ import annotations

from typing import NamedTuple

from publishers import results, topics


class FrameRef(NamedTuple):
    """What a result needs of its frame besides the answer: identity, capture time (ns, UTC), label."""

    device_id: str
    seq: int
    capture_ns: int
    label: int | None


def device_messages(frames, classes, conf, tier: str, degraded: bool, now_ns: int):
    """The result messages of `frames` (FrameRef or publishers.wire.Frame) answered with `classes`/`conf`
    at `now_ns`: [(topic, payload, indices of the frames it answers)], one message per device in frame order
    (at most results.MAX_RESULTS_PER_MESSAGE results each), plus each frame's latency in ms."""
    by_device: dict[str, tuple[list[results.Result], list[int]]] = {}
    latencies = []
    for i, (frame, cls, c) in enumerate(zip(frames, classes, conf, strict=True)):
        latency_ms = (now_ns - frame.capture_ns) / 1e6
        latencies.append(latency_ms)
        r = results.Result(frame.device_id, frame.seq, int(cls), float(c), tier, degraded, latency_ms, frame.label)
        group = by_device.get(frame.device_id)
        if group is None:
            group = by_device[frame.device_id] = ([], [])
        group[0].append(r)
        group[1].append(i)
    step = results.MAX_RESULTS_PER_MESSAGE
    out = []
    for device_id, (rs, idx) in by_device.items():
        topic = topics.results(device_id)
        for i in range(0, len(rs), step):
            out.append((topic, results.encode_many(rs[i:i + step]), idx[i:i + step]))
    return out, latencies
