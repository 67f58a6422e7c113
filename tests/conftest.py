"""Shared fixtures: a real Mosquitto on a free loopback port, client settings, repo paths."""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_workers.ingest import Received, Subscriber
from infra.bench.loadgen import descendants, proc_stats
from infra.broker import MosquittoBroker
from infra.cluster import keep_local_ray_on_loopback
from publishers.mqtt import MqttConfig

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data" / "mnist"

# Every Ray the tests start (edgeq's local one, Ray's multi-node test cluster) talks over 127.0.0.1 only.
keep_local_ray_on_loopback()


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


def _proc_net_address(field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address of /proc/net/tcp{,6} ("0100007F:1F90"): 32-bit words in host (little-endian) order."""
    hexip = field.split(":")[0]
    raw = b"".join(bytes.fromhex(hexip[i:i + 8])[::-1] for i in range(0, len(hexip), 8))
    return ipaddress.ip_address(raw)


def _is_loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (a dual-stack socket)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def non_loopback_sockets(root: int | None = None) -> list[str]:
    """TCP sockets held by `root` (default: this process) or any process below it whose local or remote
    address is not loopback (a listener on 0.0.0.0 or :: counts: it takes connections from the network)."""
    inodes: dict[str, int] = {}
    for pid in descendants(os.getpid() if root is None else root, proc_stats()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[link[8:-1]] = pid
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode not in inodes:
                continue
            state = "listen" if fields[3] == "0A" else "connection"
            ends = [_proc_net_address(local)] + ([_proc_net_address(remote)] if state == "connection" else [])
            if not all(_is_loopback(ip) for ip in ends):
                try:
                    comm = Path(f"/proc/{inodes[inode]}/comm").read_text().strip()
                except OSError:  # the process is gone meanwhile
                    comm = "?"
                found.append(f"{comm} (pid {inodes[inode]}) {state} {' -> '.join(str(ip) for ip in ends)}"
                             f" port {int(local.split(':')[1], 16)}")
    return found
