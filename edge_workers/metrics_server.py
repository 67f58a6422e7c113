"""A worker process's Prometheus metrics over HTTP (prometheus-client's server thread), for edge and cloud."""

from __future__ import annotations

import logging
import os

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.registry import CollectorRegistry

logger = logging.getLogger(__name__)

# Proposed default ports (docs/metrics.md): demo driver 9600, edge worker i 9601+i, cloud worker i 9701+i.
DRIVER_PORT = 9600
EDGE_BASE_PORT = 9601
CLOUD_BASE_PORT = 9701


def serve_metrics(port: int, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY) -> int:
    """Serve `registry` at http://addr:port/metrics from a daemon thread; return the bound port.

    port 0 lets the OS pick a free port (race-free, unlike probing first).
    The default address is loopback: pass addr="0.0.0.0" only to let other
    hosts or containers scrape, e.g. Prometheus in infra/docker-compose.yml.
    """
    if not 0 <= port < 65536:
        raise ValueError(f"metrics port must be in 0..65535 (0 = any free port), got {port}")
    try:
        started = start_http_server(port, addr=addr, registry=registry)
    except OSError as err:
        raise OSError(err.errno, f"cannot serve metrics on {addr}:{port}: {err.strerror} "
                                 "(pick another metrics_port, or 0 for any free port)") from err
    if isinstance(started, tuple):  # prometheus-client >= 0.20 returns (server, thread)
        bound = int(started[0].server_port)
    elif port:
        bound = port
    else:
        raise RuntimeError("serve_metrics(0) needs prometheus-client >= 0.20 to report the port it bound")
    logger.info("metrics on http://%s:%d/metrics", addr, bound)
    return bound


def process_location(index: int, metrics_port: int | None, metrics_addr: str) -> dict:
    """Where a worker process runs and where Prometheus can scrape it (Ray node when inside Ray).

    metrics_host is the bind address, or the node's IP when bound to all interfaces.
    """
    import ray

    inside = ray.is_initialized()
    node_ip = ray.util.get_node_ip_address() if inside else "127.0.0.1"
    return {
        "index": index, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id() if inside else None,
        "node_ip": node_ip, "metrics_port": metrics_port,
        "metrics_host": node_ip if metrics_addr in ("0.0.0.0", "::", "") else metrics_addr,
    }
