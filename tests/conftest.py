"""Shared fixtures: a real Mosquitto on a free loopback port, client settings, repo paths."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from edge_workers.ingest import Received, Subscriber
from infra.broker import MosquittoBroker
from publishers.mqtt import MqttConfig

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data" / "mnist"


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    # The broker makes its own data dir under /tmp: run as root, Mosquitto drops to
    # the `mosquitto` user, which cannot enter pytest's private tmp_path.
    with MosquittoBroker() as b:
        yield b


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray for one test module (2 CPUs; `edge` and `cloud` resources for 4 actors each)."""
    import ray

    from cloud_workers.config import RayConfig
    from infra import cluster

    started = cluster.connect(RayConfig(num_cpus=2), edge_actors=4, cloud_actors=4)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def mqtt_cfg(broker: MosquittoBroker) -> MqttConfig:
    # Short reconnect backoff so broker-restart tests finish quickly.
    return MqttConfig(host=broker.host, port=broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5)


def collect(sub: Subscriber, n: int, timeout: float) -> list[Received]:
    """Take messages from `sub` until `n` arrived or `timeout` seconds passed (bounded loop)."""
    out: list[Received] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out.extend(sub.get_batch(n - len(out), 0.1))
    return out
