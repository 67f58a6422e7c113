"""Edge side of learning in the cloud: labelled frames from the train/eval topics, reduced like the uplink, sent up.

Devices publish labelled frames on ``edgeq/v1/train/<device>`` (to learn from)
and ``edgeq/v1/eval/<device>`` (held out, to score the learned models on). An
edge worker with ``edge.learn`` on takes them through a shared subscription of
its own (one Subscriber per topic kind, beside the frames subscriber), runs the
same denoise + codec code path as the inference uplink (`EdgeProcessor.codec`,
`EdgeProcessor.denoiser`), and sends each batch to every cloud worker's
`add_training(split, codec, codes, n, labels, keys)`. The bytes it counts are
the bytes it sends: MQTT payloads in, uplink code bytes out (labels, 1 byte
per frame, are counted apart). docs/edge-learning.md describes the experiment.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

import numpy as np

from edge_workers.config import EdgeConfig
from edge_workers.ingest import Received, Subscriber
from edge_workers.processor import EdgeProcessor, FrameRejected, frame_pixels
from publishers import topics, wire
from publishers.errors import FrameDecodeError
from publishers.mqtt import MqttConfig

logger = logging.getLogger(__name__)

LEARN_KINDS = ("train", "eval")
FILTERS = {"train": topics.TRAIN_FILTER, "eval": topics.EVAL_FILTER}
MAX_PENDING = 8          # add_training calls in flight per forwarder; beyond this it waits for the oldest
BATCH_MAX = 256          # labelled frames per add_training call
CALL_TIMEOUT_S = 120.0   # an add_training call not done by then is counted as failed
PREFIX = "learn."        # counter names in EdgeWorker.stats()


def decode_labelled(msg: Received, kind: str, shape: tuple[int, int]) -> tuple[wire.Frame, np.ndarray]:
    """Decode one train/eval message: (frame, pixels uint8 [H, W]).

    Raises FrameDecodeError (wire reasons, `topic_mismatch`, `unlabelled`) or FrameRejected.
    """
    frame = wire.decode(msg.payload)
    try:
        device = topics.device_of(msg.topic, kind)
    except ValueError as err:
        raise FrameDecodeError("topic_mismatch", str(err)) from err
    if device != frame.device_id:
        raise FrameDecodeError("topic_mismatch", f"topic names device {device!r}, frame says {frame.device_id!r}")
    if frame.label is None:
        raise FrameDecodeError("unlabelled", f"{frame.device_id}#{frame.seq} on the {kind} topic has no label")
    return frame, frame_pixels(frame, shape)


class TrainingForwarder:
    """Takes labelled frames off the train/eval topics, encodes them with the edge's codec, feeds the cloud.

    Runs its own thread; `stats()` gives plain counters (prefixed ``learn.``),
    `stop()` leaves the subscriptions and sends what was received.
    """

    def __init__(self, cfg: EdgeConfig, mqtt_cfg: MqttConfig, index: int, processor: EdgeProcessor,
                 cloud_names: tuple[str, ...], namespace: str):
        self.cfg, self.index, self.processor = cfg, index, processor
        self.cloud_names, self.namespace = tuple(cloud_names), namespace
        self._clouds: list = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.pending: collections.deque = collections.deque()
        self.subs = {
            kind: Subscriber(mqtt_cfg, f"{cfg.group}-{index}-{kind}-{os.getpid()}",
                             topics.shared(FILTERS[kind], cfg.group), max_queue=cfg.queue_size).start()
            for kind in LEARN_KINDS
        }
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"edge-learn-{index}", daemon=True)
        self._thread.start()

    def wait_subscribed(self, timeout: float = 30.0) -> None:
        for sub in self.subs.values():
            sub.wait_subscribed(timeout)

    def stats(self) -> dict:
        out = {PREFIX + k: v for k, v in self.counts.items()}
        out[PREFIX + "pending_calls"] = len(self.pending)
        for kind, sub in self.subs.items():
            out.update({f"{PREFIX}dropped.{kind}.{k}": v for k, v in dict(sub.dropped).items()})
        return out

    def stop(self, drain_s: float = 10.0) -> dict:
        """Unsubscribe, forward what was received and wait for the cloud (bounded by `drain_s`)."""
        for sub in self.subs.values():
            sub.unsubscribe()
        self._draining.set()
        self._thread.join(timeout=drain_s)
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=5)
        left = sum(s.queue.qsize() for s in self.subs.values())
        if left:
            self.counts["dropped.shutdown"] += left
        for sub in self.subs.values():
            sub.stop()
        return self.stats()

    # ------------------------------------------------------------ loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            got = 0
            for kind, sub in self.subs.items():
                batch = sub.get_batch(BATCH_MAX, 0.0 if got else 0.02)
                got += len(batch)
                if not batch:
                    continue
                try:
                    self._forward(kind, batch)
                except Exception:  # never let one bad batch take the worker down
                    logger.exception("edge %d: learning batch failed", self.index)
                    self.counts["batch_errors"] += 1
            self._poll(block=len(self.pending) >= MAX_PENDING or (self._draining.is_set() and not got))
            if self._draining.is_set() and not got and not self.pending and all(
                    s.queue.empty() for s in self.subs.values()):
                return

    def _connect(self) -> list:
        import ray

        if not self._clouds:
            self._clouds = [ray.get_actor(n, namespace=self.namespace) for n in self.cloud_names]
        return self._clouds

    def _forward(self, kind: str, batch: list[Received]) -> None:
        nbytes = sum(len(m.payload) for m in batch)
        self.counts[f"{kind}.received"] += len(batch)
        self.counts["bytes_device_to_edge"] += nbytes
        self.counts[f"{kind}.bytes_device_to_edge"] += nbytes
        frames, images = [], []
        for msg in batch:
            try:
                frame, px = decode_labelled(msg, kind, self.processor.frame_shape)
            except (FrameDecodeError, FrameRejected) as err:
                self.counts[f"rejected.{err.reason}"] += 1
                logger.debug("rejected %s frame on %s: %s", kind, msg.topic, err)
                continue
            frames.append(frame)
            images.append(px)
        if not frames:
            return
        t0, cpu0 = time.perf_counter(), time.thread_time()
        images = np.stack(images)
        codec = self.processor.codec
        denoised = None if codec.name == "raw" else self.processor.denoiser.apply(images)
        codes = codec.compute_codes(images, denoised=denoised)
        self.counts[f"{kind}.preprocess_us"] += int((time.perf_counter() - t0) * 1e6)
        self.counts[f"{kind}.preprocess_cpu_us"] += int((time.thread_time() - cpu0) * 1e6)  # less load-sensitive
        self.counts[f"{kind}.preprocessed_frames"] += len(frames)
        payload = np.ascontiguousarray(codes).tobytes()
        labels = np.asarray([f.label for f in frames], dtype=np.uint8).tobytes()
        keys = [(f.device_id, f.seq) for f in frames]
        try:
            clouds = self._connect()
        except Exception as err:  # noqa: BLE001 - no cloud: count and carry on
            logger.warning("edge %d: no cloud worker for learning frames: %s", self.index, err)
            self.counts[f"dropped.{kind}.no_cloud"] += len(frames)
            return
        if not clouds:
            self.counts[f"dropped.{kind}.no_cloud"] += len(frames)
            return
        for cloud in clouds:  # every cloud worker learns the same model
            ref = cloud.add_training.remote(kind, codec.name, payload, len(frames), labels, keys)
            self.pending.append((ref, time.monotonic() + CALL_TIMEOUT_S, len(frames), kind))
            self.counts["bytes_edge_to_cloud"] += len(payload)
            self.counts[f"{kind}.bytes_edge_to_cloud"] += len(payload)
            self.counts["label_bytes_edge_to_cloud"] += len(labels)
            self.counts[f"{kind}.frames_to_cloud"] += len(frames)

    def _poll(self, block: bool) -> None:
        import ray

        while self.pending:
            ref, deadline, n, kind = self.pending[0]
            done, _ = ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()) if block else 0.0)
            if not done and time.monotonic() < deadline:
                return
            self.pending.popleft()
            block = False
            try:
                if not done:
                    raise TimeoutError(f"add_training not done after {CALL_TIMEOUT_S:.0f}s")
                ray.get(ref)
                self.counts[f"{kind}.cloud_ok"] += n
            except Exception as err:  # noqa: BLE001 - a failing cloud: counted, the frames are lost for learning
                logger.warning("edge %d: add_training failed: %s", self.index, err)
                self.counts[f"{kind}.cloud_error"] += n
