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
            names = [] if cfg.edge.policy == "edge-only" else cluster.cloud_workers_running(cfg.ray.namespace)
            workers = cluster.start_edge(cfg.edge, cfg.mqtt, cfg.ray, names)
            if names:
                progress(f"[edge] using cloud workers {', '.join(names)}")
        progress(f"[{tier}] {len(workers.names)} workers up: {', '.join(workers.names)}; metrics on "
                 f"{', '.join(workers.metrics_targets())}; Ctrl-C stops")
        while True:
            time.sleep(STATS_EVERY_S)
            lines = []
            for name, handle in zip(workers.names, workers.handles, strict=True):
                try:
                    lines.append(f"{name}: {ray.get(handle.stats.remote(), timeout=30)}")
                except ray.exceptions.RayError as err:  # one dead actor must not stop the others
                    lines.append(f"{name}: not answering ({type(err).__name__})")
            progress(f"[{tier}] " + "; ".join(lines))
    finally:
        if workers is not None:
            cluster.stop_tier(workers, "stop" if tier == "edge" else None)
        if started:
            ray.shutdown()
