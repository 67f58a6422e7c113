"""`edgeq edge` and `edgeq cloud`: run one tier's actors on a (possibly remote) Ray cluster until interrupted."""

from __future__ import annotations

import time

from infra import cluster
from publishers.run import Progress

STATS_EVERY_S = 10.0


def serve(cfg, tier: str, progress: Progress) -> int:
    """Start the `tier` ("edge" or "cloud") workers, print their counters periodically, stop on Ctrl-C/SIGTERM."""
    import ray

    started = cluster.connect(cfg.ray, cfg.edge.actors if tier == "edge" else 0,
                              cfg.cloud.actors if tier == "cloud" else 0)
    workers = None
    try:
        if tier == "cloud":
            workers = cluster.start_cloud(cfg.cloud, cfg.ray)
        else:
            names = [] if cfg.edge.policy == "edge-only" else [
                f"{cluster.CLOUD_PREFIX}{i}" for i in range(cfg.cloud.actors)]
            workers = cluster.start_edge(cfg.edge, cfg.mqtt, cfg.ray, names)
        progress(f"[{tier}] {len(workers.names)} workers up: {', '.join(workers.names)}; metrics on "
                 f"{', '.join(workers.metrics_targets())}; Ctrl-C stops")
        while True:
            time.sleep(STATS_EVERY_S)
            stats = ray.get([h.stats.remote() for h in workers.handles], timeout=30)
            progress(f"[{tier}] " + "; ".join(f"{n}: {s}" for n, s in zip(workers.names, stats)))
    finally:
        if workers is not None:
            cluster.stop_tier(workers, "stop" if tier == "edge" else None)
        if started:
            ray.shutdown()
