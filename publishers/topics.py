"""MQTT topic names: the one place that spells them.

    edgeq/v1/frames/<device_id>     frames, device -> edge (wire format)
    edgeq/v1/train/<device_id>      labelled frames to learn from, device -> edge -> cloud (docs/edge-learning.md)
    edgeq/v1/eval/<device_id>       labelled held-out frames the cloud scores its learned models on
    edgeq/v1/tensors/<device_id>    tensor frames (wire version 2): a partition head's output, device -> edge
    edgeq/v1/results/<device_id>    results, edge/cloud -> device
    edgeq/v1/status/<component>     "online"/"offline", retained, set by Last Will
"""

from __future__ import annotations

import re

from publishers.wire import DEVICE_ID_RE

COMPONENT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,96}$")

PREFIX = "edgeq/v1"
FRAMES_FILTER = f"{PREFIX}/frames/+"
RESULTS_FILTER = f"{PREFIX}/results/+"
STATUS_FILTER = f"{PREFIX}/status/+"
TRAIN_FILTER = f"{PREFIX}/train/+"
EVAL_FILTER = f"{PREFIX}/eval/+"
TENSORS_FILTER = f"{PREFIX}/tensors/+"
FRAME_KINDS = ("frames", "train", "eval", "tensors")  # topics that carry wire-format frames from devices
EDGE_SHARE_GROUP = "edgeq-edge"

ONLINE = b"online"
OFFLINE = b"offline"


def _checked(name: str, what: str, pattern: re.Pattern[str] = DEVICE_ID_RE) -> str:
    if not pattern.fullmatch(name):
        raise ValueError(f"{what} must match {pattern.pattern}, got {name!r}")
    return name


def frames(device_id: str) -> str:
    """Topic a device publishes its frames to."""
    return f"{PREFIX}/frames/{_checked(device_id, 'device id')}"


def tensors(device_id: str) -> str:
    """Topic a device running a partition's head (`edgeq publish --head`) publishes its tensor frames to."""
    return f"{PREFIX}/tensors/{_checked(device_id, 'device id')}"


def frames_of_kind(kind: str, device_id: str) -> str:
    """Topic a device publishes wire frames of `kind` (frames | train | eval | tensors) to."""
    if kind not in FRAME_KINDS:
        raise ValueError(f"frame topic kind must be one of {FRAME_KINDS}, got {kind!r}")
    return f"{PREFIX}/{kind}/{_checked(device_id, 'device id')}"


def results(device_id: str) -> str:
    """Topic the results for a device's frames are published to."""
    return f"{PREFIX}/results/{_checked(device_id, 'device id')}"


def status(component: str) -> str:
    """Retained availability topic of one component (a device, an edge or cloud worker)."""
    return f"{PREFIX}/status/{_checked(component, 'component name', COMPONENT_RE)}"


def shared(topic_filter: str, group: str = EDGE_SHARE_GROUP) -> str:
    """Shared-subscription form of a filter, so the broker balances it across a group."""
    return f"$share/{group}/{topic_filter}"


def device_of(topic: str, kind: str = "frames") -> str:
    """The device id in a `kind` topic (frames, tensors, results, ...). Raises ValueError for any other topic."""
    head = f"{PREFIX}/{kind}/"
    if not topic.startswith(head):
        raise ValueError(f"topic {topic!r} is not a {kind} topic ({head}<device_id>)")
    return _checked(topic[len(head):], "device id in topic")
