"""Standing up the tiers on Ray: connect (or start a local Ray), launch cloud and edge actors by resource.

Edge actors ask for the custom resource `edge`, cloud actors for `cloud`, so on
a multi-node cluster each lands on a node that declares its tier
(`ray start --resources='{"edge": 4}'`). A local Ray gets both resources,
sized to the actors requested.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field

from cloud_workers.config import CloudConfig, RayConfig
from cloud_workers.worker import ACTOR_PREFIX as CLOUD_PREFIX
from cloud_workers.worker import CloudWorker
from edge_workers.config import EdgeConfig
from edge_workers.reduce import PCA_FILE
from edge_workers.runtime import available as available_runtimes
from edge_workers.runtime import models_dir
from edge_workers.worker import ACTOR_PREFIX as EDGE_PREFIX
from edge_workers.worker import EdgeWorker
from publishers.errors import ConfigError, EdgeqError
from publishers.mqtt import MqttConfig

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0  # model loading and numba compilation on a slow node
# A worker process that dies (OOM, a crash, `ray.kill(h, no_restart=False)`) is restarted by Ray with the
# same constructor arguments: an edge actor resumes its persistent MQTT session (its unacknowledged frames
# come back), a cloud actor reloads its models under the same handle. Bounded, so a crash loop ends.
MAX_RESTARTS = 10


# A local Ray registers the host's routable address (eth0's) as its node address and listens on all
# interfaces, so traffic between edgeq's own processes on one machine would leave loopback. With this switch
# at 0 (its default on macOS and Windows, where Ray does not run clusters) Ray's node address is 127.0.0.1
# and its servers listen there only (ray._private.services.get_node_ip_address reads it).
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_local_ray_on_loopback() -> None:
    """Make a Ray started by this process use 127.0.0.1 only, unless the user set RAY_LOOPBACK_ENV.

    For a Ray this machine runs alone (edgeq's local mode, Ray's test cluster); a Ray that other
    machines join (`ray.address`) needs the routable address and is left as it is.
    """
    os.environ.setdefault(RAY_LOOPBACK_ENV, "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ[RAY_LOOPBACK_ENV].lower() not in ("1", "true"):
        constants.ENABLE_RAY_CLUSTER = False  # ray was imported earlier and had read the switch then


def connect(ray_cfg: RayConfig, edge_actors: int = 0, cloud_actors: int = 0) -> bool:
    """ray.init for edgeq. Returns True when this call started a local Ray (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if not ray_cfg.address:
        keep_local_ray_on_loopback()
    # ray.init installs its own SIGTERM handler (exit 15 at once); keep the caller's (the CLI's
    # handler unwinds like Ctrl-C so workers and brokers are stopped cleanly).
    on_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        if ray_cfg.address:
            ray.init(address=ray_cfg.address, namespace=ray_cfg.namespace, logging_level=logging.WARNING)
            return False
        ray.init(
            address="local",  # a new local Ray even if another one runs on this machine (`ray start`)
            num_cpus=ray_cfg.num_cpus or None,
            resources={"edge": max(edge_actors, 1), "cloud": max(cloud_actors, 1)},
            namespace=ray_cfg.namespace, include_dashboard=False, logging_level=logging.WARNING,
        )
        return True
    finally:
        if on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)


@dataclass
class Tier:
    """Handles and `info()` of the actors of one tier."""

    names: list[str]
    handles: list
    infos: list[dict] = field(default_factory=list)

    def metrics_targets(self) -> list[str]:
        return [f"{i['metrics_host']}:{i['metrics_port']}" for i in self.infos if i.get("metrics_port")]


class WorkerStartError(EdgeqError):
    """Actors of a tier failed while starting (bad model file, port in use, broker unreachable, ...)."""


def _gather(tier: str, handles: list, method: str) -> list:
    """Call `method` on every new actor and wait; on failure kill them all and raise one readable error."""
    import ray

    try:
        return ray.get([getattr(h, method).remote() for h in handles], timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as err:
        _kill(handles)
        raise WorkerStartError(f"{tier} workers not ready after {START_TIMEOUT_S:.0f}s "
                               f"(does the cluster have enough `{tier}` resources?)") from err
    except ray.exceptions.RayError as err:
        _kill(handles)
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise WorkerStartError(f"{tier} workers failed to start: {lines[-1] if lines else err}") from err


def _kill(handles: list) -> None:
    import ray

    for h in handles:
        ray.kill(h)


def thread_env(threads: int) -> dict:
    """Ray runtime_env of an edgeq actor: BLAS/OpenMP pools pinned to `threads`, normal CPU priority, log level.

    Measured: with OpenBLAS's default two threads on a busy 2-core machine the
    denoiser's small matmuls spin (a batch of 8 frames took 32 ms instead of 1.6 ms).
    Ray starts worker processes at nice 15 (`RAY_worker_niceness`), below the
    broker and the devices' processes on the same node; the workers are the
    latency-critical service here, so they run at nice 0 like the rest.
    """
    n = str(max(1, threads))
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())  # the driver's --log-level
    return {"env_vars": {"OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n,
                         "OMP_WAIT_POLICY": "PASSIVE", "RAY_worker_niceness": "0", "EDGEQ_LOG_LEVEL": level}}


def _check_models(directory: str, files: list[str], section: str) -> None:
    """Fail in the driver, with the path, before actors die on a missing model file."""
    base = models_dir(directory)
    missing = [str(base / f) for f in files if not (base / f).is_file()]
    if missing:
        raise ConfigError(f"{section}: model file(s) not found: {', '.join(missing)} "
                          f"(set {section}.models_dir or run `edgeq train` / `edgeq compress`)")


def _check_free(names: list[str], namespace: str) -> None:
    import ray

    for name in names:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            continue
        raise ConfigError(f"a Ray actor named {name!r} already runs in namespace {namespace!r}: "
                          "stop the other edgeq process or pick another ray.namespace")


def start_cloud(cfg: CloudConfig, ray_cfg: RayConfig) -> Tier:
    """Launch cfg.actors cloud workers (resource `cloud`) and wait until their models are loaded."""
    import ray

    _check_models(cfg.models_dir, [cfg.frame_model, cfg.pca_model, PCA_FILE], "cloud")
    names = [f"{CLOUD_PREFIX}{i}" for i in range(cfg.actors)]
    _check_free(names, ray_cfg.namespace)
    actor = ray.remote(CloudWorker)
    handles = [
        actor.options(name=n, namespace=ray_cfg.namespace, resources={"cloud": 1}, num_cpus=0,
                      max_restarts=MAX_RESTARTS, runtime_env=thread_env(cfg.threads)).remote(cfg, i)
        for i, n in enumerate(names)
    ]
    tier = Tier(names, handles)
    tier.infos = _gather("cloud", handles, "info")
    return tier


def start_edge(cfg: EdgeConfig, mqtt_cfg: MqttConfig, ray_cfg: RayConfig, cloud_names: list[str]) -> Tier:
    """Launch cfg.actors edge workers (resource `edge`); returns once each is subscribed."""
    import ray

    _check_models(cfg.models_dir, [cfg.model, PCA_FILE], "edge")
    if cfg.runtime not in available_runtimes():
        raise ConfigError(f"edge.runtime must be one of {', '.join(available_runtimes())}, got {cfg.runtime!r}")
    if cfg.policy != "edge-only" and not cloud_names:
        raise ConfigError(f"edge.policy {cfg.policy!r} needs cloud workers and none were found in namespace "
                          f"{ray_cfg.namespace!r}: start them first (`edgeq cloud`) or use --policy edge-only")
    names = [f"{EDGE_PREFIX}{i}" for i in range(cfg.actors)]
    _check_free(names, ray_cfg.namespace)
    actor = ray.remote(EdgeWorker)
    handles = [
        actor.options(name=n, namespace=ray_cfg.namespace, resources={"edge": 1}, num_cpus=0,
                      max_restarts=MAX_RESTARTS, runtime_env=thread_env(cfg.threads))
        .remote(cfg, mqtt_cfg, i, tuple(cloud_names), ray_cfg.namespace)
        for i, n in enumerate(names)
    ]
    tier = Tier(names, handles)
    tier.infos = _gather("edge", handles, "ready")
    return tier


def cloud_workers_running(namespace: str) -> list[str]:
    """Names of the cloud worker actors alive in `namespace` (started by this or another process)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == namespace and a["name"].startswith(CLOUD_PREFIX)]
    return sorted(names, key=lambda n: int(n[len(CLOUD_PREFIX):]) if n[len(CLOUD_PREFIX):].isdigit() else 1 << 30)


def stop_tier(tier: Tier, method: str | None = None, timeout: float = 30.0) -> list:
    """Call `method` (e.g. "stop") on every actor if given, collect its return values, then kill the actors."""
    import ray

    out = []
    if method:
        try:
            out = ray.get([getattr(h, method).remote() for h in tier.handles], timeout=timeout)
        except Exception as err:  # a dead actor must not keep the others running
            logger.warning("stopping %s: %s", tier.names, err)
    _kill(tier.handles)
    return out
