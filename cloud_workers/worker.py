"""Cloud worker: a Ray actor holding the bigger models, classifying what edge workers send up.

One model per uplink codec family: the cloud CNN for frame codecs (`raw`,
`denoised`), the MLP on PCA coefficients for `pca-f16` / `pca-int8`. Edge
workers call `infer(codec, codes, n)` with a timeout, or `infer_and_answer`, with
which the actor publishes the results to the devices itself through its own MQTT
client (cloud_workers.publisher); the actor is named `edgeq-cloud-<i>` in the Ray
namespace so edge workers started by another process (``edgeq edge``) find it.
"""

from __future__ import annotations

import collections
import logging
import os
import time

import numpy as np

from cloud_workers import metrics
from cloud_workers.config import CloudConfig
from cloud_workers.learning import LearningMixin
from cloud_workers.publisher import ResultPublisher
from cloud_workers.tail import TailMixin
from edge_workers.answers import FrameRef, device_messages
from edge_workers.codecs import CODECS, FRAME_CODECS, UplinkCodec
from edge_workers.reduce import PCA_FILE, PCAModel
from edge_workers.routing import confidence
from edge_workers.runtime import load_runtime, models_dir

logger = logging.getLogger(__name__)

ACTOR_PREFIX = "edgeq-cloud-"


class CloudWorker(LearningMixin, TailMixin):
    """Classifies uplink batches, and learns from reduced labelled frames (cloud_workers.learning).

    Plain class; `infra.cluster` wraps it with `ray.remote`.
    """

    def __init__(self, cfg: CloudConfig, index: int = 0, serve_metrics: bool = True):
        # Actor entry: the launcher passes the driver's --log-level in the actor's environment.
        logging.basicConfig(level=os.environ.get("EDGEQ_LOG_LEVEL", "WARNING"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg, self.index = cfg, index
        mdir = models_dir(cfg.models_dir)
        self.frame_model = load_runtime(cfg.runtime, mdir / cfg.frame_model, threads=cfg.threads)  # onnx or qcnn
        self.pca_model = load_runtime("onnx", mdir / cfg.pca_model, threads=cfg.threads)
        self.frame_model.warmup()
        self.pca_model.warmup()
        (self.pca_k,) = self.pca_model.input_shape
        self.static_pca_k = self.pca_k
        self.pca_k = cfg.pca_components or self.pca_k  # another k is served by a learned model only
        pca = PCAModel.load(mdir / PCA_FILE)
        frame_shape = tuple(self.frame_model.input_shape[1:])
        self.codecs = {
            name: UplinkCodec(name, pca=pca, k=None if name in FRAME_CODECS else self.pca_k, frame_shape=frame_shape)
            for name in CODECS
        }
        self.counts: collections.Counter[str] = collections.Counter()
        self._publishers: dict[tuple, ResultPublisher] = {}  # one MQTT client per broker and account
        self._init_learning(pca, frame_shape, cfg.threads)
        self._init_tails()  # cloud.partitions: tails for the tensor frames edges forward
        self.metrics_port = None
        if serve_metrics:
            from edge_workers.metrics_server import serve_metrics as serve

            port = cfg.metrics_port + index if cfg.metrics_port else 0
            self.metrics_port = serve(port, cfg.metrics_addr)

    def info(self) -> dict:
        """Where this actor runs and what it accepts (for launchers, tests and edge workers)."""
        from edge_workers.metrics_server import process_location

        return {
            **process_location(self.index, self.metrics_port, self.cfg.metrics_addr), "pca_k": self.pca_k,
            "code_sizes": {name: c.code_size for name, c in self.codecs.items()}, "tail_cuts": self.tail_cuts,
            "frame_model": {"file": self.cfg.frame_model, "runtime": self.cfg.runtime},
        }

    def infer(self, codec: str, codes: bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Classify n frames. codes: n * code_size bytes of one codec -> (classes int64 [n], confidence float32 [n]).

        Raises ValueError for an unknown codec or a byte count that does not match.
        """
        c = self.codecs.get(codec)
        if c is None:
            metrics.CLOUD_ERRORS.labels("unknown_codec").inc()
            raise ValueError(f"unknown uplink codec {codec!r}; this cloud worker takes {', '.join(self.codecs)}")
        if n < 1 or len(codes) != n * c.code_size:
            metrics.CLOUD_ERRORS.labels("wrong_size").inc()
            raise ValueError(f"{codec}: expected {n} x {c.code_size} = {n * c.code_size} bytes, got {len(codes)}")
        learned = self.learned_model(codec, c.code_size)  # a model learned from reduced frames wins
        if learned is None and codec not in FRAME_CODECS and self.pca_k != self.static_pca_k:
            metrics.CLOUD_ERRORS.labels("no_model").inc()
            raise RuntimeError(f"{codec} with k={self.pca_k}: no model learned yet (the PCA MLP takes k="
                               f"{self.static_pca_k})")
        codes_2d = np.frombuffer(codes, dtype=np.uint8).reshape(n, c.code_size)
        t0 = time.perf_counter()
        if learned is not None:
            key, logits = "cloud-learned", learned.logits(codes_2d)
        else:
            model, key = (self.frame_model, "cloud-cnn") if codec in FRAME_CODECS else (self.pca_model, "cloud-pca-mlp")
            logits = model.predict(c.decode_codes(codes_2d))
        metrics.CLOUD_INFERENCE_SECONDS.labels(key).observe(time.perf_counter() - t0)
        metrics.CLOUD_FRAMES.labels(codec).inc(n)
        metrics.CLOUD_BYTES.labels(codec).inc(len(codes))
        metrics.CLOUD_BATCH.observe(n)
        self.counts["frames"] += n
        self.counts["bytes"] += len(codes)
        return logits.argmax(axis=1).astype(np.int64), confidence(logits)

    def answer_to(self, mqtt_cfg) -> bool:
        """Open (or reuse) this actor's MQTT client for `mqtt_cfg` (publishers.mqtt.MqttConfig, the edge's) and
        wait for it to connect; returns whether it did. `infer_and_answer` opens it too, without waiting."""
        return self._publisher(mqtt_cfg).wait_connected()

    def _publisher(self, mqtt_cfg) -> ResultPublisher:
        key = (mqtt_cfg.host, mqtt_cfg.port, mqtt_cfg.username, mqtt_cfg.protocol, mqtt_cfg.qos, mqtt_cfg.tls_ca)
        pub = self._publishers.get(key)
        if pub is None:
            pub = self._publishers[key] = ResultPublisher(mqtt_cfg, f"{ACTOR_PREFIX}{self.index}-results")
        return pub

    def infer_and_answer(self, codec: str, codes: bytes, n: int, frames: list[FrameRef], mqtt_cfg,
                         answer_by_ns: int):
        """`infer`, then publish the results to the frames' devices (tier `cloud`), unless it is past
        `answer_by_ns` (wall clock, ns): the caller answers on its own after that.

        Returns (classes, confidence, published): published = (latency ms of each frame, payload bytes) once
        every result message was written to the broker's connection (paho keeps each until its PUBACK and
        re-sends it after a reconnect), so the caller may acknowledge the frames; None when not (not
        connected, late): the caller publishes the answers then.
        """
        classes, conf = self.infer(codec, codes, n)
        if len(frames) != n:
            raise ValueError(f"{n} frames to answer, {len(frames)} frame references")
        return classes, conf, self._answer_devices(frames, classes, conf, mqtt_cfg, answer_by_ns)

    def _answer_devices(self, frames: list, classes, conf, mqtt_cfg, answer_by_ns: int):
        """Publish the frames' results (tier `cloud`) unless it is past `answer_by_ns`: (latency ms of each
        frame, payload bytes) once every message was written to the connection, else None."""
        now_ns = time.time_ns()
        if now_ns >= answer_by_ns:
            self.counts["answers_late"] += 1
            return None
        messages, latencies = device_messages(frames, classes, conf, "cloud", False, now_ns)
        if not self._publisher(mqtt_cfg).publish([(topic, payload) for topic, payload, _ in messages]):
            self.counts["answers_not_published"] += 1
            return None
        self.counts["answers_published"] += len(frames)
        return latencies, sum(len(payload) for _, payload, _ in messages)

    def stats(self) -> dict:
        return dict(self.counts)
