"""Tiers on a real multi-node Ray cluster: edge actors land on the `edge` node, cloud actors on the `cloud` node."""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import time

import pytest

from cloud_workers.config import CloudConfig, RayConfig
from edge_workers.config import EdgeConfig
from infra import cluster
from infra.collector import ResultCollector
from publishers.config import PublishConfig
from publishers.run import publish
from tests.conftest import DATA_DIR, REPO, non_loopback_sockets


@pytest.fixture
def two_node_cluster():
    """Ray's multi-node test cluster on this machine: a head node with {edge: 2}, a worker node with {cloud: 2}."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # another test module may have left a local Ray running in this process
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"edge": 2}})
    cloud_node = c.add_node(num_cpus=1, resources={"cloud": 2})
    ray.init(address=c.address, namespace="cluster-test")
    c.wait_for_nodes()
    try:
        yield c, c.head_node.node_id, cloud_node.node_id
    finally:
        ray.shutdown()
        c.shutdown()


def test_each_actor_lands_on_its_tier_node_and_frames_cross_nodes(two_node_cluster, mqtt_cfg) -> None:
    import ray

    c, edge_node, cloud_node = two_node_cluster
    assert edge_node != cloud_node
    ray_cfg = RayConfig(namespace="cluster-test")
    assert cluster.connect(ray_cfg) is False  # already connected: edgeq uses the existing cluster
    cloud = cluster.start_cloud(CloudConfig(actors=2, metrics_port=0), ray_cfg)
    edge = cluster.start_edge(EdgeConfig(actors=2, metrics_port=0, policy="cloud-only"), mqtt_cfg, ray_cfg,
                              cloud.names)
    try:
        assert [i["node_id"] for i in cloud.infos] == [cloud_node, cloud_node]
        assert [i["node_id"] for i in edge.infos] == [edge_node, edge_node]
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}  # both nodes on loopback
        # Every frame goes edge node -> cloud node and back as a result.
        collector = ResultCollector(mqtt_cfg, "cluster-results").start()
        try:
            report = publish(mqtt_cfg, PublishConfig(devices=2, count=50, rate_hz=0, data_dir=str(DATA_DIR)))
            assert collector.wait_for(100, 60)
            assert non_loopback_sockets() == []  # the nodes, their workers and the broker: loopback only
        finally:
            answers = collector.stop()
        assert report.total("acked") == 100
        assert len(answers.unique) == 100 and answers.tiers == {"cloud": 100}
        assert answers.accuracy >= 0.95  # cloud CNN on clean frames; observed 1.0
        edge_stats = list(cluster.stop_tier(edge, "stop"))
        assert sum(s.get("frames_to_cloud", 0) for s in edge_stats) == 100
        assert sum(s["frames"] for s in cluster.stop_tier(cloud, "stats")) == 100
    finally:
        cluster.stop_tier(edge)
        cluster.stop_tier(cloud)


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    """Read the process's stderr until a line contains `needle` (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            if needle in line:
                return line
    raise AssertionError(f"{needle!r} not seen within {timeout}s; stderr so far:\n{''.join(seen)[-3000:]}")


def test_edgeq_cloud_and_edgeq_edge_commands_serve_a_cluster(two_node_cluster, mqtt_cfg) -> None:
    c, _, _ = two_node_cluster
    common = ["--ray-address", c.address, "--ray-namespace", "cli-test"]
    cloud = subprocess.Popen([sys.executable, "-m", "infra.cli", "cloud", *common, "--cloud-metrics-port", "0"],
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    edge = None
    try:
        _wait_for_line(cloud, "[cloud] 1 workers up", 120)
        edge = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "edge", *common, "--broker", mqtt_cfg.address,
             "--edge-metrics-port", "0", "--policy", "cloud-only"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
        _wait_for_line(edge, "[edge] 2 workers up", 120)
        collector = ResultCollector(mqtt_cfg, "cli-results").start()
        try:
            publish(mqtt_cfg, PublishConfig(devices=2, count=30, rate_hz=0, data_dir=str(DATA_DIR)))
            assert collector.wait_for(60, 60)
        finally:
            answers = collector.stop()
        assert len(answers.unique) == 60 and answers.tiers == {"cloud": 60}
        for proc in (edge, cloud):  # SIGTERM stops the workers and exits like Ctrl-C
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 130
    finally:
        for proc in (edge, cloud):
            if proc is not None and proc.poll() is None:
                proc.kill()
