"""The edge's side of the device/edge split: devices' head tensor frames checked, sent to the cloud tails,
or answered here.

With `edge.partitions` set, an edge actor's MQTT client is in the shared subscription of both
edgeq/v1/frames/+ and edgeq/v1/tensors/+ (`SplitSubscriber`). The worker hands each batch's
tensor-topic messages to `TensorPath.take`, which:

- decodes and checks them against the manifest's cuts (`TensorIngest`); a rejected frame is
  counted in `edgeq_decode_errors_total` by its reason (`TENSOR_REASONS`, a bounded set) and
  acknowledged, and the others of the batch go on;
- under policy `edge-only`, answers them with the edge's own copy of the tails (tier `edge`);
- otherwise sends their payloads, unchanged, to a cloud actor (`CloudWorker.infer_tensors[_and_answer]`),
  which runs the tails and answers the devices itself; the frames are acknowledged when the
  cloud's answers were (at-least-once, as for pixel frames). When the cloud fails or times out,
  the edge runs the tails and answers degraded (`classify`).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import paho.mqtt.client as mqtt

from edge_workers import metrics
from edge_workers.ingest import DrivenSubscriber, Received
from edge_workers.offload_controller import EDGE_ONLY, OFFLOAD, Decision
from edge_workers.routing import confidence
from edge_workers.runtime import models_dir
from edge_workers.split_metrics import SplitMetrics
from edge_workers.split_planner import Option
from edge_workers.split_runner import EdgeHead, PartRunner, find_manifest
from edge_workers.tensor_ingest import TensorIngest, TensorItem, group
from publishers import topics

logger = logging.getLogger(__name__)

TENSORS_PREFIX = topics.TENSORS_FILTER.removesuffix("+")


def is_tensor(msg: Received) -> bool:
    """Whether `msg` came on a device's tensor topic (edgeq/v1/tensors/<device>)."""
    return msg.topic.startswith(TENSORS_PREFIX)


class SplitSubscriber(DrivenSubscriber):
    """A DrivenSubscriber in several topic filters at once (one SUBSCRIBE, one UNSUBSCRIBE)."""

    def __init__(self, mqtt_cfg, client_id: str, topic_filter: tuple[str, ...], **kwargs) -> None:
        super().__init__(mqtt_cfg, client_id, topic_filter[0], **kwargs)
        self.filters = tuple(topic_filter)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.warning("subscriber refused by broker: %s", reason_code)
            return
        self.connects += 1
        if self._unsubscribed.is_set():
            return
        client.subscribe([(f, self.mqtt_cfg.qos) for f in self.filters])

    def request_unsubscribe(self) -> bool:
        rc, _ = self._client.unsubscribe(list(self.filters))
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._unsubscribed.set()
            return False
        return True


class TensorPath:
    """The partition manifest's cuts as the edge serves them: the ingest check and the tails (for edge answers)."""

    def __init__(self, cfg) -> None:  # cfg: edge_workers.config.EdgeConfig with `partitions` set
        self.manifest_path = find_manifest(cfg.partitions, models_dir(cfg.models_dir))
        self.ingest = TensorIngest.from_manifest(self.manifest_path)
        self.tails = PartRunner(self.manifest_path, "tail", threads=cfg.threads)
        # Edge/cloud split: uncertain pixel frames go up as this head's tensor frames instead of codec payloads.
        self.head = (EdgeHead(self.manifest_path, cfg.uplink_cut, cfg.uplink_tensor_codec, threads=cfg.threads)
                     if cfg.uplink_cut else None)
        self.split_metrics = SplitMetrics("edge_to_cloud")
        self._record_choice(cfg)

    def _record_choice(self, cfg) -> None:
        """Export the configured edge -> cloud split (no controller runs in the worker yet): the head's cut and
        codec, or the uplink codec (cut `default`), the mode and the threshold (edgeq_split_choice/mode/threshold)."""
        option = None
        if self.head is not None:
            option = Option(self.head.cut_id, self.head.codec, 0.0, 0.0, self.head.frame_bytes("dev0"))
        mode = EDGE_ONLY if cfg.policy == "edge-only" else OFFLOAD
        self.split_metrics.record(Decision(mode, cfg.threshold, option, "initial", changed=True))

    def observe_call(self, n: int, sent_s: float, now_s: float) -> None:
        """A finished cloud call of `n` frames sent at monotonic `sent_s`: its latency, once per frame."""
        for _ in range(n):
            self.split_metrics.observe_latency(now_s - sent_s)

    def uplink(self, codes: np.ndarray, frames: list) -> list[bytes] | None:
        """The edge head's tensor frames for forwarded pixel frames (codes: uint8 [n, H*W], the raw or denoised
        codec's payloads), one per frame with its ids; None without `edge.uplink_cut`."""
        if self.head is None:
            return None
        side = math.isqrt(codes.shape[1])  # square frames: 784 -> 28 x 28
        return self.head.encode(codes.reshape(len(codes), side, side), frames)

    @property
    def cuts(self) -> tuple[str, ...]:
        return self.tails.cuts

    def check_cloud(self, name: str, info: dict) -> None:
        """ValueError when cloud actor `name` (its `info()`) does not run the tails of every cut served here."""
        missing = sorted(set(self.cuts) - set(info.get("tail_cuts", ())))
        if missing:
            raise ValueError(f"cloud worker {name} runs no tail for cuts {missing} of {self.manifest_path.name}: "
                             "set cloud.partitions to the same manifest")

    def classify(self, items: list[TensorItem] | list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """The tails' answers for accepted items (or payloads of valid tensor frames), in their order:
        (classes int64 [n], confidence float32 [n])."""
        if items and isinstance(items[0], (bytes, bytearray)):
            items, rejected = self.ingest.decode_many(items)
            if rejected:
                raise ValueError(f"{len(rejected)} tensor frames rejected: {rejected[0][1]}")
        classes = np.full(len(items), -1, dtype=np.int64)
        conf = np.zeros(len(items), dtype=np.float32)
        pos = {id(item): i for i, item in enumerate(items)}
        for cut_id, batch in group(items).items():
            logits = self.tails.predict(cut_id, batch.x)
            idx = np.fromiter((pos[id(it)] for it in batch.items), dtype=np.int64, count=len(batch.items))
            classes[idx], conf[idx] = logits.argmax(axis=1), confidence(logits)
        return classes, conf

    def take(self, worker, batch: list[Received]) -> list[Received]:
        """Handle a batch's tensor-topic messages for `worker` (edge_workers.worker.EdgeWorker); returns the others."""
        self._take(worker, [m for m in batch if is_tensor(m)])
        return [m for m in batch if not is_tensor(m)]

    def _take(self, worker, msgs: list[Received]) -> None:
        if not msgs:
            return
        items, rejected = self.ingest.decode_many(msgs)
        for msg, err in rejected:
            metrics.child(metrics.DECODE_ERRORS, err.reason).inc()
            worker.counts[f"rejected.{err.reason}"] += 1
            worker.sub.ack(msg)  # counted: a bad frame is never redelivered
        if not items:
            return
        worker.counts["tensor_frames"] += len(items)
        frames, tmsgs = [i.frame for i in items], [i.msg for i in items]
        if worker.cfg.policy == "edge-only":
            classes, conf = self.classify(items)
            worker._publish(frames, tmsgs, classes, conf, "edge")
            return
        unknown = np.full(len(items), -1, dtype=np.int64)
        try:
            if not worker._clouds:
                worker._connect_clouds()
            worker._submit(frames, tmsgs, b"", unknown, np.zeros(len(items), dtype=np.float32),
                           tensors=[bytes(i.msg.payload) for i in items])
        except Exception as err:  # noqa: BLE001 - no reachable cloud: the edge runs the tails, degraded
            logger.warning("cannot reach the cloud for tensor frames: %s", err)
            metrics.child(metrics.CLOUD_REQUESTS, "error").inc()
            worker.counts["cloud_error"] += 1
            classes, conf = self.classify(items)
            worker._publish(frames, tmsgs, classes, conf, "edge", degraded=True)

    @staticmethod
    def call(cloud, direct: bool, payloads: list[bytes], refs: list, mqtt_cfg, answer_by_ns: int):
        """Start the cloud call for tensor frames on actor handle `cloud`: a ray.ObjectRef of
        (classes, conf[, published])."""
        if direct:
            return cloud.infer_tensors_and_answer.remote(payloads, refs, mqtt_cfg, answer_by_ns)
        return cloud.infer_tensors.remote(payloads)
