"""`edgeq experiment edge-learning`: learning in the cloud on edge-reduced data, through broker, edge and cloud actors.

Reproduces Huang et al., "When deep learning meets edge computing" (ICNP 2017)
with edgeq's own components. Per sensor-noise setting, one pipeline per uplink
codec configuration (raw = the cloud-only baseline, denoised, pca-f16/pca-int8
at several k) runs side by side: a cloud worker and an edge worker (with
``edge.learn``) in a Ray namespace of their own, the edge in its own shared-
subscription group, so every group gets every frame from the one broker.
Devices publish the train split on the train topic and the test split on the
eval topic; each edge denoises and encodes them with its codec and sends them
to its cloud, which fits a model on nested training subsets and scores each
on the held-out frames it received; then the test split is published on the
frames topic and answered by the hot-swapped learned models (served accuracy).
docs/edge-learning.md explains the method; infra.experiment_report writes the page.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cloud_workers.config import CloudConfig, RayConfig
from cloud_workers.learning import wait_fit
from edge_workers.codecs import FRAME_CODECS
from edge_workers.config import CODECS, EdgeConfig
from edge_workers.reduce import PCA_FILE, PCAModel
from edge_workers.runtime import models_dir
from infra import cluster
from infra.broker import MosquittoBroker
from publishers.config import PublishConfig
from publishers.datasets import load_mnist
from publishers.errors import ConfigError
from publishers.mqtt import MqttConfig
from publishers.noise import NOISE_KINDS
from publishers.run import Progress, publish
from publishers.sources import default_data_dir

logger = logging.getLogger(__name__)

WAIT_S = 900.0  # bound on waiting for frames to reach the clouds or be answered


@dataclass
class EdgeLearningConfig:
    """What the experiment sweeps. train_sizes: 0 = the whole train split."""

    codecs: tuple[str, ...] = CODECS
    pca_sizes: tuple[int, ...] = (16, 32, 64)
    train_sizes: tuple[int, ...] = (300, 1000, 3000, 0)
    noise: tuple[str, ...] = ("none", "gaussian")
    noise_level: float = 0.2
    data_dir: str = ""
    models_dir: str = ""
    devices: int = 4
    test_frames: int = 0  # held-out frames from the test split; 0 = all of it
    serve_check: bool = True
    hidden: tuple[int, ...] = (256,)
    max_epochs: int = 30
    patience: int = 5
    seed: int = 1234

    def __post_init__(self) -> None:
        bad = [c for c in self.codecs if c not in CODECS]
        if bad or not self.codecs:
            raise ConfigError(f"unknown codec(s) {bad or list(self.codecs)}; available: {', '.join(CODECS)}")
        bad = [n for n in self.noise if n not in NOISE_KINDS]
        if bad or not self.noise:
            raise ConfigError(f"unknown noise kind(s) {bad or list(self.noise)}; available: {', '.join(NOISE_KINDS)}")
        if not self.train_sizes or any(n < 0 or 0 < n < 20 for n in self.train_sizes):
            raise ConfigError(f"training-set sizes must be >= 20 (0 = all), got {list(self.train_sizes)}")
        if any(k < 1 for k in self.pca_sizes) or (not self.pca_sizes and any(c.startswith("pca") for c in self.codecs)):
            raise ConfigError(f"PCA sizes must be >= 1, got {list(self.pca_sizes)}")
        if self.devices < 1 or self.test_frames < 0:
            raise ConfigError(f"devices >= 1 and test_frames >= 0 required, got {self.devices}, {self.test_frames}")

    def configs(self) -> list[tuple[str, int]]:
        """(codec, k) pairs; k = 0 for the frame codecs."""
        return [(c, 0) for c in self.codecs if c in FRAME_CODECS] + [
            (c, k) for c in self.codecs if c not in FRAME_CODECS for k in self.pca_sizes]

    def learn_config(self) -> dict:
        return {"hidden": self.hidden, "max_epochs": self.max_epochs, "patience": self.patience, "seed": self.seed}


@dataclass
class FitRow:
    noise: str
    codec: str
    k: int
    code_size: int
    n_train: int
    heldout_accuracy: float
    val_accuracy: float
    train_seconds: float
    train_cpu_seconds: float
    epochs: int


@dataclass
class RunRow:
    """One (noise, codec, k) pipeline: its bytes, times and served accuracy."""

    noise: str
    codec: str
    k: int
    code_size: int
    train_frames: int
    eval_frames: int
    device_bytes_train: int       # sum of MQTT payloads the devices published on the train topic
    bytes_device_to_edge: int     # train topic, counted by the edge
    bytes_edge_to_cloud: int      # train codes sent to the cloud, counted by the edge
    cloud_bytes_received: int     # train + eval codes, counted by the cloud
    preprocess_cpu_us: float      # edge denoise + encode CPU time per train frame
    data_seconds: float           # publish start -> this cloud stored every train and eval frame
    fit_seconds: float            # all fits of this config
    served_accuracy: float | None = None
    served_frames: int = 0
    degraded: int = 0

    @property
    def label(self) -> str:
        return config_label(self.codec, self.k)


def config_label(codec: str, k: int) -> str:
    """"raw", "pca-int8 k=32", ..."""
    return codec if not k else f"{codec} k={k}"


@dataclass
class ExperimentResult:
    cfg: EdgeLearningConfig
    fits: list[FitRow] = field(default_factory=list)
    runs: list[RunRow] = field(default_factory=list)
    seconds: float = 0.0
    train_split: int = 0
    test_split: int = 0
    pca_fit_samples: int = 0


def _check_against_data(cfg: EdgeLearningConfig, n_train: int, pca: PCAModel) -> list[int]:
    """Training-set sizes resolved against the data (0 -> all); ConfigError for impossible settings."""
    sizes = sorted({n or n_train for n in cfg.train_sizes})
    if sizes[-1] > n_train:
        raise ConfigError(f"training-set size {sizes[-1]} > {n_train} images in the train split")
    pca_codecs = any(c not in FRAME_CODECS for c in cfg.codecs)
    if pca_codecs and max(cfg.pca_sizes) > pca.k_max:
        raise ConfigError(f"PCA k={max(cfg.pca_sizes)} > {pca.k_max} components in {PCA_FILE}")
    if pca_codecs and max(cfg.pca_sizes) > sizes[0]:
        raise ConfigError(f"more PCA components (k={max(cfg.pca_sizes)}) than samples in the smallest training "
                          f"set ({sizes[0]}): use larger --train-sizes or smaller --pca-sizes")
    return sizes


def run_edge_learning(cfg: EdgeLearningConfig, progress: Progress) -> ExperimentResult:
    """Run the whole sweep; progress lines go to `progress`."""
    data_dir = cfg.data_dir or str(default_data_dir())
    n_train, n_test = len(load_mnist(data_dir, "train")), len(load_mnist(data_dir, "test"))
    n_test = min(cfg.test_frames or n_test, n_test)
    pca = PCAModel.load(models_dir(cfg.models_dir) / PCA_FILE)
    sizes = _check_against_data(cfg, n_train, pca)
    result = ExperimentResult(cfg, train_split=n_train, test_split=n_test,
                              pca_fit_samples=int(pca.meta.get("fit_samples", 0)))
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(MosquittoBroker())
        mqtt_cfg = MqttConfig(host=broker.host, port=broker.port)
        n_cfg = len(cfg.configs())
        if cluster.connect(RayConfig(), edge_actors=n_cfg, cloud_actors=n_cfg):
            import ray

            stack.callback(ray.shutdown)
        progress(f"[experiment] broker {broker.address}; {n_cfg} codec configurations x {len(cfg.noise)} noise "
                 f"settings; train sizes {sizes}; {n_train} train / {n_test} test images from {data_dir}")
        for round_, noise in enumerate(cfg.noise):
            _run_noise(cfg, noise, round_, mqtt_cfg, data_dir, sizes, result, progress)
    result.seconds = time.monotonic() - t0
    return result


@dataclass
class _Pipe:
    codec: str
    k: int
    ns: str
    cloud: cluster.Tier
    edge: cluster.Tier | None = None


def _start_pipe(cfg: EdgeLearningConfig, codec: str, k: int, ns: str, mqtt_cfg: MqttConfig) -> _Pipe:
    ray_cfg = RayConfig(namespace=ns)
    cloud = cluster.start_cloud(CloudConfig(actors=1, metrics_port=0, pca_components=k,
                                            models_dir=cfg.models_dir), ray_cfg)
    pipe = _Pipe(codec, k, ns, cloud)
    try:
        edge_cfg = EdgeConfig(actors=1, group=ns, metrics_port=0, policy="cloud-only", codec=codec,
                              pca_components=k or EdgeConfig.pca_components, runtime="onnx",
                              model="edge_cnn.onnx", models_dir=cfg.models_dir, learn=True,
                              cloud_timeout_s=120.0, batch_max=256)
        pipe.edge = cluster.start_edge(edge_cfg, mqtt_cfg, ray_cfg, cloud.names)
    except Exception:
        cluster.stop_tier(cloud)
        raise
    return pipe


def _publish(cfg: EdgeLearningConfig, mqtt_cfg: MqttConfig, data_dir: str, split: str, topic: str, n: int,
             noise: str, seed: int):
    per_device = n // cfg.devices
    pub = PublishConfig(devices=cfg.devices, rate_hz=0, count=per_device, split=split, data_dir=data_dir,
                        noise=noise, noise_level=cfg.noise_level, seed=seed, topic=topic, progress_s=10.0,
                        shuffle=True)  # the first n frames of a split sorted by class are a random sample
    report = publish(mqtt_cfg, pub)
    if report.dropped:
        raise RuntimeError(f"devices dropped frames publishing the {split} split: {report.dropped}")
    return report


def _run_noise(cfg: EdgeLearningConfig, noise: str, round_: int, mqtt_cfg: MqttConfig, data_dir: str,
               sizes: list[int], result: ExperimentResult, progress: Progress) -> None:
    import ray

    level = f" {cfg.noise_level:g}" if noise != "none" else ""
    t_start = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(_start_pipe, cfg, codec, k, f"edgeq-exp-{round_}-{i}", mqtt_cfg)
                   for i, (codec, k) in enumerate(cfg.configs())]
        pipes, errors = [], []
        for f in futures:
            try:
                pipes.append(f.result())
            except Exception as err:  # noqa: BLE001 - stop what started, then re-raise the first failure
                errors.append(err)
    try:
        if errors:
            raise errors[0]
        progress(f"[experiment] noise {noise}{level}: {len(pipes)} cloud+edge pipelines up in "
                 f"{time.monotonic() - t_start:.0f}s")
        seed = cfg.seed + 1000 * round_
        t_pub = time.monotonic()
        train_rep = _publish(cfg, mqtt_cfg, data_dir, "train", "train", sizes[-1], noise, seed)
        eval_rep = _publish(cfg, mqtt_cfg, data_dir, "test", "eval", result.test_split, noise, seed + 1)
        n_tr, n_ev = train_rep.total("acked"), eval_rep.total("acked")
        progress(f"[experiment] noise {noise}{level}: published {n_tr} train + {n_ev} eval frames in "
                 f"{time.monotonic() - t_pub:.1f}s; waiting for the clouds to store them")
        data_s = _wait_stored(pipes, n_tr, n_ev, t_pub, progress)
        runs = []
        for pipe in pipes:
            fit_s = _fit_sizes(cfg, pipe, noise, sizes, result, progress)
            runs.append((pipe, fit_s))
        served = {}
        if cfg.serve_check:
            t_srv = time.monotonic()
            _publish(cfg, mqtt_cfg, data_dir, "test", "frames", result.test_split, noise, seed + 1)
            served = _wait_served(pipes, (result.test_split // cfg.devices) * cfg.devices)
            progress(f"[experiment] noise {noise}{level}: test split answered by every learned model in "
                     f"{time.monotonic() - t_srv:.1f}s")
        for pipe, fit_s in runs:
            cloud = ray.get(pipe.cloud.handles[0].learning_stats.remote(), timeout=60)
            edge = (cluster.stop_tier(pipe.edge, "stop") or [{}])[0]  # {} if the edge died: zero counts
            size = _code_size(pipe)
            right, wrong = served.get(pipe.ns, (0, 0, 0))[:2]
            result.runs.append(RunRow(
                noise, pipe.codec, pipe.k, size, n_tr, n_ev, train_rep.total("bytes_sent"),
                edge.get("learn.train.bytes_device_to_edge", 0), edge.get("learn.train.bytes_edge_to_cloud", 0),
                cloud.get("bytes_received", 0),
                edge.get("learn.train.preprocess_cpu_us", 0) / max(1, edge.get("learn.train.preprocessed_frames", 0)),
                data_s[pipe.ns], fit_s, right / (right + wrong) if right + wrong else None, right + wrong,
                served.get(pipe.ns, (0, 0, 0))[2]))
            pipe.edge = None
    finally:
        for pipe in pipes:
            if pipe.edge is not None:
                cluster.stop_tier(pipe.edge, "stop")
            cluster.stop_tier(pipe.cloud)


def _code_size(pipe: _Pipe) -> int:
    if pipe.codec in FRAME_CODECS:
        return 784
    return 2 * pipe.k if pipe.codec == "pca-f16" else pipe.k


def _wait_stored(pipes: list[_Pipe], n_train: int, n_eval: int, t0: float, progress: Progress) -> dict[str, float]:
    """Poll the clouds until each stored every train and eval frame; returns seconds since t0 per pipeline."""
    import ray

    done: dict[str, float] = {}
    deadline, next_note = time.monotonic() + WAIT_S, time.monotonic() + 15
    while len(done) < len(pipes):
        for pipe in pipes:
            if pipe.ns in done:
                continue
            stats = ray.get(pipe.cloud.handles[0].learning_stats.remote(), timeout=60)
            slot = f"{pipe.codec}.{_code_size(pipe)}"
            if stats.get(f"stored.train.{slot}", 0) >= n_train and stats.get(f"stored.eval.{slot}", 0) >= n_eval:
                done[pipe.ns] = time.monotonic() - t0
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(done)} of {len(pipes)} clouds stored all {n_train} + {n_eval} frames "
                               f"after {WAIT_S:.0f}s")
        if time.monotonic() > next_note:
            next_note += 15
            progress(f"[experiment] {len(done)}/{len(pipes)} clouds have all frames after {time.monotonic() - t0:.0f}s")
        time.sleep(0.2)
    return done


def _fit_sizes(cfg: EdgeLearningConfig, pipe: _Pipe, noise: str, sizes: list[int], result: ExperimentResult,
               progress: Progress) -> float:
    """Fit on each training-set size in turn (the last, largest, stays served); returns the summed fit time."""
    handle, size = pipe.cloud.handles[0], _code_size(pipe)
    total = 0.0
    for n in sizes:
        status = wait_fit(handle, _get(handle.fit.remote(pipe.codec, size, n, cfg.learn_config())))
        total += status["train_seconds"]
        row = FitRow(noise, pipe.codec, pipe.k, size, n, status["heldout_accuracy"], status["val_accuracy"],
                     status["train_seconds"], status["train_cpu_seconds"], status["epochs_run"])
        result.fits.append(row)
        progress(f"[experiment] noise {noise} {config_label(pipe.codec, pipe.k)}: n={n} held-out "
                 f"{100 * row.heldout_accuracy:.2f} % (val {100 * row.val_accuracy:.1f} %), fit "
                 f"{row.train_seconds:.1f}s, {row.epochs} epochs")
    return total


def _get(ref):
    import ray

    return ray.get(ref, timeout=120)


def _wait_served(pipes: list[_Pipe], n: int) -> dict[str, tuple[int, int, int]]:
    """Wait until every edge answered `n` frames; (correct, wrong, degraded) per pipeline from the edge counters."""
    import ray

    deadline = time.monotonic() + WAIT_S
    while True:
        stats = {p.ns: ray.get(p.edge.handles[0].stats.remote(), timeout=60) for p in pipes}
        answered = {ns: sum(v for k, v in s.items() if k.startswith("results.")) for ns, s in stats.items()}
        if all(a >= n for a in answered.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return {ns: (s.get("cloud.correct", 0), s.get("cloud.wrong", 0), s.get("results.edge.degraded", 0))
            for ns, s in stats.items()}
