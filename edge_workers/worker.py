"""Edge worker: a Ray actor with its own MQTT client in the shared subscription, answering frames.

The processing thread of an actor does everything on the frames path: it runs the MQTT
client's I/O itself (edge_workers.ingest.DrivenSubscriber: no paho network thread contends
for the GIL), micro-batches, decodes, runs the EdgeProcessor, publishes edge answers and acks,
sends uncertain frames to a cloud worker without waiting, and finishes cloud calls as they
come back (or times them out, answering with the edge's own prediction marked degraded). A cloud
worker publishes its answers to the devices itself (`CloudWorker.infer_and_answer`, issue 17):
only the call's completion comes back, and the edge then acknowledges those frames.

At-least-once: the actor's MQTT session is persistent under a stable client id
(`<group>-<namespace>-<index>`) and QoS 1 frames are acknowledged only after the broker acknowledged
the message holding their result, published by this actor or by a cloud actor (docs/reliability.md).
A crashed actor, restarted by Ray with the same arguments, resumes the session and gets its
unacknowledged frames again.
"""

from __future__ import annotations

import collections
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from edge_workers import metrics
from edge_workers.answers import FrameRef, device_messages
from edge_workers.config import EdgeConfig
from edge_workers.ingest import DrivenSubscriber, Received, decode_frame
from edge_workers.learning import TrainingForwarder
from edge_workers.offload_loop import OffloadLoop
from edge_workers.processor import EdgeProcessor, FrameRejected, frame_pixels
from publishers import topics
from publishers.errors import FrameDecodeError
from publishers.mqtt import MqttConfig
from publishers.wire import Frame

logger = logging.getLogger(__name__)

ACTOR_PREFIX = "edgeq-edge-"
MAX_PENDING_CLOUD_CALLS = 8  # per actor; beyond this the loop waits for the oldest call
ANSWER_MARGIN_S = 0.1  # a cloud worker publishes only up to this long (at most half the timeout) before the deadline
UNSUBACK_WAIT_S = 5.0  # when stopping, drain without the broker's UNSUBACK after this long
FLUSH_S = 5.0  # when stopping, wait at most this long for the broker to acknowledge the last result


@dataclass
class PendingCall:
    """A cloud call in flight for some frames of one batch."""

    ref: object               # ray.ObjectRef
    frames: list[Frame]
    msgs: list[Received]      # the frames' MQTT messages, acknowledged once answered
    edge_classes: np.ndarray  # fallback answers (-1 when the edge did not classify)
    edge_conf: np.ndarray
    codes: bytes
    deadline: float
    cloud: int                # index of the cloud actor called
    attempt: int = 1
    tensors: list | None = None  # tensor frame payloads (bytes) instead of codes: edge_workers.tensor_path

    @property
    def nbytes(self) -> int:
        return len(self.codes) if self.tensors is None else sum(map(len, self.tensors))


class EdgeWorker:
    """Plain class; `infra.cluster` wraps it with `ray.remote` and the `edge` resource."""

    def __init__(self, cfg: EdgeConfig, mqtt_cfg: MqttConfig, index: int = 0, cloud_names: tuple[str, ...] = (),
                 namespace: str = "edgeq", serve_metrics: bool = True):
        # Actor entry: the launcher passes the driver's --log-level in the actor's environment.
        logging.basicConfig(level=os.environ.get("EDGEQ_LOG_LEVEL", "WARNING"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg, self.index, self.namespace, self.mqtt_cfg = cfg, index, namespace, mqtt_cfg
        self.processor = EdgeProcessor(cfg)
        self.tensors, sub_cls, topic = None, DrivenSubscriber, topics.shared(topics.FRAMES_FILTER, cfg.group)
        if cfg.partitions:  # devices' head tensor frames too (device/edge split)
            from edge_workers.tensor_path import SplitSubscriber, TensorPath

            self.tensors, sub_cls = TensorPath(cfg), SplitSubscriber
            topic = (topic, topics.shared(topics.TENSORS_FILTER, cfg.group))
        self.cloud_names = tuple(cloud_names)
        self._clouds: list = []
        self._direct: list[bool] = []  # per cloud actor: it publishes its answers itself (infer_and_answer)
        self._next_cloud = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.pending: collections.deque[PendingCall] = collections.deque()
        self.offload = OffloadLoop.for_worker(self)  # the threshold under edge.uplink_budget_kbps/p99_budget_ms
        self.metrics_port = None
        if serve_metrics:
            from edge_workers.metrics_server import serve_metrics as serve

            self.metrics_port = serve(cfg.metrics_port + index if cfg.metrics_port else 0, cfg.metrics_addr)
        # Stable id + persistent session: a restarted actor resumes its session and its unacked frames.
        # The Ray namespace keeps two deployments sharing a broker (and a group) from taking over each other's ids.
        self.sub = sub_cls(
            mqtt_cfg, f"{cfg.group}-{namespace}-{index}", topic, max_queue=cfg.queue_size,
            status_component=f"edge.{index}", persistent=True, manual_ack=True,
        ).start()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._drops_reported: collections.Counter[str] = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name=f"edge-{index}", daemon=True)
        self._thread.start()
        # Labelled train/eval frames for learning in the cloud (edge_workers.learning): off unless edge.learn.
        self.learning = (TrainingForwarder(cfg, mqtt_cfg, index, self.processor, self.cloud_names, namespace)
                         if cfg.learn else None)
        # Everything allocated so far (Ray, the model runtimes, numba) lives as long as the actor: keep it out
        # of the collector. A full collection scanned it all: 55 ms on an idle machine, 177-202 ms pauses of
        # the processing thread measured under load in `edgeq bench pipeline` (issue 7).
        gc.freeze()

    # ------------------------------------------------------------ control

    def ready(self, timeout: float = 30.0) -> dict:
        """Wait until the broker acknowledged the subscription; return `info()`."""
        self.sub.wait_subscribed(timeout)
        if self.learning:
            self.learning.wait_subscribed(timeout)
        if self.cfg.policy != "edge-only":
            self._connect_clouds()
        return self.info()

    def info(self) -> dict:
        from edge_workers.metrics_server import process_location

        return process_location(self.index, self.metrics_port, self.cfg.metrics_addr)

    def stats(self) -> dict:
        """Counters since start (plain ints), plus the current queue depth and dropped-by-reason."""
        out = dict(self.counts)
        out["queue_depth"] = self.sub.queue.qsize()
        out.update({f"dropped.{k}": v for k, v in dict(self.sub.dropped).items()})  # copy: paho's thread adds keys
        out["pending_cloud_calls"] = len(self.pending)
        out["threshold"] = float(self.processor.threshold)  # the routing threshold applied now
        out["acked"] = self.sub.acks
        out["rss_bytes"] = rss_bytes()
        if self.learning:
            out.update(self.learning.stats())
        return out

    def stop(self, drain_s: float = 10.0) -> dict:
        """Leave the shared subscription, answer what was received (bounded by `drain_s`), disconnect.

        The processing thread (which owns the MQTT I/O) unsubscribes; after the broker's UNSUBACK no
        further frames come to this worker, so it drains its queue and in-flight cloud calls, waits
        for the broker to take the last result, disconnects and exits. Anything still unanswered at
        the deadline is counted as dropped (reason `shutdown`); unacknowledged, those frames stay in
        this client id's broker session and come back when it reconnects. Returns the final stats.
        """
        if self.learning:
            self.learning.stop(drain_s)
        self._draining.set()
        self._thread.join(timeout=drain_s)
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=FLUSH_S + 5)
        left = self.sub.queue.qsize() + sum(len(c.frames) for c in self.pending)
        if left:
            metrics.child(metrics.DROPS, "shutdown").inc(left)
            self.counts["dropped.shutdown"] += left
        return self.stats()

    # ------------------------------------------------------------ cloud pool

    def _connect_clouds(self) -> None:
        import ray

        if self._clouds or not self.cloud_names:
            return
        handles = [ray.get_actor(name, namespace=self.namespace) for name in self.cloud_names]
        infos = ray.get([h.info.remote() for h in handles], timeout=60)
        want = self.processor.codec.code_size
        for name, info in zip(self.cloud_names, infos, strict=True):
            if info["code_sizes"].get(self.cfg.codec) != want:
                raise ValueError(
                    f"cloud worker {name} takes {info['code_sizes'].get(self.cfg.codec)} B per frame for codec "
                    f"{self.cfg.codec!r} (pca k={info['pca_k']}), this edge sends {want} B: "
                    "set edge.pca_components to the cloud PCA model's k"
                )
            if self.tensors is not None:
                self.tensors.check_cloud(name, info)
        self._clouds = handles
        # Each cloud actor opens its own MQTT client now, so the first calls can already be answered from there;
        # one that cannot connect is called with `infer`, and the edge publishes its answers.
        try:
            self._direct = [bool(ok) for ok in ray.get([h.answer_to.remote(self.mqtt_cfg) for h in handles],
                                                       timeout=30)]
        except Exception as err:  # noqa: BLE001 - the edge publishes cloud answers itself then
            logger.warning("cloud workers cannot publish answers themselves: %s", err)
            self._direct = [False] * len(handles)

    def _submit(self, frames: list[Frame], msgs: list[Received], codes: bytes, classes, conf, attempt: int = 1,
                after: int | None = None, tensors: list | None = None) -> None:
        """Send one uplink batch to a cloud actor: round robin, or the one after `after` for a retry."""
        if not self._clouds:
            raise RuntimeError("no cloud workers connected")
        if after is None:
            index = self._next_cloud % len(self._clouds)
            self._next_cloud += 1
        else:
            index = (after + 1) % len(self._clouds)
        timeout = self.cfg.cloud_timeout_s
        answer_by = time.time_ns() + int(1e9 * (timeout - min(ANSWER_MARGIN_S, timeout / 2)))
        if tensors is not None:  # head tensor frames (the devices' or the edge's own head): the cloud runs the tails
            refs = [FrameRef(f.device_id, f.seq, f.capture_ns, f.label) for f in frames]
            ref = self.tensors.call(self._clouds[index], self._direct[index], tensors, refs, self.mqtt_cfg, answer_by)
        elif self._direct[index]:
            # the cloud publishes while there is time for its completion to come back before the deadline
            refs = [FrameRef(f.device_id, f.seq, f.capture_ns, f.label) for f in frames]
            ref = self._clouds[index].infer_and_answer.remote(self.cfg.codec, codes, len(frames), refs,
                                                              self.mqtt_cfg, answer_by)
        else:
            ref = self._clouds[index].infer.remote(self.cfg.codec, codes, len(frames))
        self.pending.append(PendingCall(ref, frames, msgs, classes, conf, codes, time.monotonic() + timeout, index,
                                        attempt, tensors))
        # Bytes count every send (a retry moves them again); frames count once.
        nbytes = self.pending[-1].nbytes
        metrics.child(metrics.PAYLOAD_BYTES, "edge_to_cloud").inc(nbytes)
        self.counts["bytes_edge_to_cloud"] += nbytes
        if attempt == 1:
            self.counts["frames_to_cloud"] += len(frames)

    def _poll_cloud(self, block: bool = False) -> None:
        """Finish cloud calls that are done or past their deadline. `block`: wait for the oldest."""
        import ray

        while self.pending:
            call = self.pending[0]
            timeout = max(0.0, call.deadline - time.monotonic()) if block else 0.0
            done, _ = ray.wait([call.ref], timeout=timeout)
            if not done and time.monotonic() < call.deadline:
                return
            self.pending.popleft()
            block = False
            if not done:
                metrics.child(metrics.CLOUD_REQUESTS, "timeout").inc()
                ray.cancel(call.ref)
                self._fallback(call, "timeout")
                continue
            try:
                classes, conf, *published = ray.get(call.ref)
                if len(classes) != len(call.frames) or len(conf) != len(call.frames):
                    raise ValueError(f"cloud answered {len(classes)} frames of {len(call.frames)}")
            except Exception as err:  # a dead or failing cloud actor, or a bad answer: answer at the edge
                logger.warning("cloud call failed: %s", err)
                metrics.child(metrics.CLOUD_REQUESTS, "error").inc()
                self._fallback(call, "error")
                continue
            metrics.child(metrics.CLOUD_REQUESTS, "ok").inc()
            self.counts["cloud_ok"] += 1
            self.offload.on_call_done(call.nbytes, call.deadline - self.cfg.cloud_timeout_s, time.monotonic())
            if self.tensors is not None:  # edgeq_split_measured_latency_seconds{hop="edge_to_cloud"}
                self.tensors.observe_call(len(call.frames), call.deadline - self.cfg.cloud_timeout_s, time.monotonic())
            # Published by the cloud actor before it returned: only acknowledge. Otherwise publish here.
            self._publish(call.frames, call.msgs, classes, conf, "cloud",
                          published=published[0] if published else None)

    def _fallback(self, call: PendingCall, outcome: str) -> None:
        """The cloud did not answer: retry once on the next actor, else answer with the edge's prediction."""
        self.counts[f"cloud_{outcome}"] += 1
        self.offload.on_call_failed()
        if call.attempt == 1 and len(self._clouds) > 1:
            try:
                self._submit(call.frames, call.msgs, call.codes, call.edge_classes, call.edge_conf, attempt=2,
                             after=call.cloud, tensors=call.tensors)
                return
            except Exception as err:  # noqa: BLE001 - any failure to resend means: answer here
                logger.warning("cloud retry failed: %s", err)
        if call.tensors is not None and (call.edge_classes < 0).any():  # no edge answer: the edge's tails give it
            return self._publish(call.frames, call.msgs, *self.tensors.classify(call.tensors), "edge", degraded=True)
        self._answer_degraded(call.frames, call.msgs, call.edge_classes, call.edge_conf)

    def _answer_degraded(self, frames: list[Frame], msgs: list[Received], classes: np.ndarray,
                         conf: np.ndarray) -> None:
        """Publish the edge's own answers, marked degraded; classify first where the edge has not (cloud-only)."""
        if (classes < 0).any():
            images = np.stack([frame_pixels(f, self.processor.frame_shape) for f in frames])
            classes, conf = self.processor.classify(images)
        self._publish(frames, msgs, classes, conf, "edge", degraded=True)

    # ------------------------------------------------------------ processing

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            self.sub.flush(timeout=FLUSH_S)
            self.sub.stop()

    def _serve(self) -> None:
        """Until stopped: take a batch (reading the socket), handle it, finish cloud calls. Once draining:
        unsubscribe, and return when the UNSUBACK came (or UNSUBACK_WAIT_S passed) and nothing is left."""
        wait_s = self.cfg.batch_wait_ms / 1000.0
        unsub_deadline = None
        while not self._stop.is_set():
            batch = []
            try:
                draining = self._draining.is_set()
                if draining and unsub_deadline is None:
                    unsub_deadline = time.monotonic() + UNSUBACK_WAIT_S
                    self.sub.request_unsubscribe()
                # With cloud calls in flight (or when draining), come back soon; otherwise sleep on the socket.
                busy = bool(self.pending) or draining
                batch = self.sub.get_batch(self.cfg.batch_max, 0.002 if busy else 0.05, linger_s=wait_s)
                metrics.QUEUE_DEPTH.set(self.sub.queue.qsize())
                self._report_queue_drops()
                if batch:
                    with self.sub.hold_writes():  # the batch's results and acks leave in one send
                        self._handle(batch)
                self.offload.maybe_tick()
                if self.pending:
                    with self.sub.hold_writes():
                        self._poll_cloud(block=len(self.pending) >= MAX_PENDING_CLOUD_CALLS or draining)
                elif draining and not batch and self.sub.queue.empty() and (
                        self.sub.unsubscribed or time.monotonic() > unsub_deadline):
                    return
            except Exception:  # never let one bad batch take the worker down
                logger.exception("edge worker %d: batch failed", self.index)
                self.counts["batch_errors"] += 1
                metrics.child(metrics.DROPS, "batch_error").inc(len(batch))
                self._ack_abandoned(batch)

    def _ack_abandoned(self, batch: list[Received]) -> None:
        """Ack a failed batch's frames that no cloud call still holds: a frame that fails once would
        fail again, and an unacked one would hold a slot of the broker's in-flight window forever."""
        held = {id(m) for call in self.pending for m in call.msgs}
        for msg in batch:
            if id(msg) not in held:
                self.sub.ack(msg)

    def _report_queue_drops(self) -> None:
        """Move the ingest queue's drop counts (kept by the paho callback) into the metric."""
        for reason, n in dict(self.sub.dropped).items():
            new = n - self._drops_reported[reason]
            if new:
                metrics.child(metrics.DROPS, reason).inc(new)
                self._drops_reported[reason] = n

    def _handle(self, batch) -> None:
        waited_ns = max(0, time.time_ns() - batch[0].arrival_ns)
        metrics.child(metrics.STAGE_SECONDS, "queue_wait").observe(waited_ns / 1e9)
        metrics.FRAMES_RECEIVED.inc(len(batch))
        nbytes = sum(len(m.payload) for m in batch)
        metrics.child(metrics.PAYLOAD_BYTES, "device_to_edge").inc(nbytes)
        metrics.BATCH_SIZE.observe(len(batch))
        self.counts["received"] += len(batch)
        self.counts["bytes_device_to_edge"] += nbytes
        if self.tensors is not None:  # head tensor frames (device/edge split) go their own way
            batch = self.tensors.take(self, batch)
        frames, msgs, images = [], [], []
        t_decode = time.perf_counter()
        for msg in batch:
            try:
                frame = decode_frame(msg)
                images.append(frame_pixels(frame, self.processor.frame_shape))
            except (FrameDecodeError, FrameRejected) as err:
                metrics.child(metrics.DECODE_ERRORS, err.reason).inc()
                self.counts[f"rejected.{err.reason}"] += 1
                logger.debug("rejected frame on %s: %s", msg.topic, err)
                self.sub.ack(msg)  # counted: a bad frame is never redelivered
                continue
            frames.append(frame)
            msgs.append(msg)
            self.counts["pixel_bytes"] += frame.pixels.nbytes
        if not frames:
            return
        metrics.child(metrics.STAGE_SECONDS, "decode").observe(time.perf_counter() - t_decode)
        d = self.processor.process(np.stack(images))
        local = np.flatnonzero(~d.to_cloud)
        if len(local):
            self._publish([frames[i] for i in local], [msgs[i] for i in local], d.classes[local],
                          d.confidences[local], "edge")
        up = np.flatnonzero(d.to_cloud)
        if len(up):
            up_frames, up_msgs = [frames[i] for i in up], [msgs[i] for i in up]
            try:
                if not self._clouds:
                    self._connect_clouds()
                self._submit(up_frames, up_msgs, d.uplink.tobytes(), d.classes[up], d.confidences[up],
                             tensors=self.tensors and self.tensors.uplink(d.uplink, up_frames))
            except Exception as err:  # noqa: BLE001 - no reachable cloud: the edge answers, degraded
                logger.warning("cannot reach the cloud: %s", err)
                metrics.child(metrics.CLOUD_REQUESTS, "error").inc()
                self.counts["cloud_error"] += 1
                self.offload.on_call_failed()
                self._answer_degraded(up_frames, up_msgs, d.classes[up], d.confidences[up])

    def _publish(self, frames: list[Frame], msgs: list[Received], classes, conf, tier: str,
                 degraded: bool = False, published: tuple | None = None) -> None:
        """Publish one result message per device of the group (its results in frame order, see
        `edge_workers.answers.device_messages`); each message's frames are acknowledged once the broker
        acknowledged it (DrivenSubscriber.publish). `published` = (latency ms per frame, payload bytes): a cloud
        actor published these results (written to its connection), so only acknowledge and count.

        Counters are updated once per batch and the latency histogram's child is looked up once: a label
        lookup takes a lock and a dict access, per frame that was wasted on the hot path. One message per
        device instead of per frame saves paho's publish and PUBACK work, the broker's and the consumer's.
        """
        if published is None:
            messages, latencies = device_messages(frames, classes, conf, tier, degraded, time.time_ns())
            nbytes = 0
            for topic, payload, idx in messages:
                self.sub.publish(topic, payload, ack=[msgs[i] for i in idx])  # acked once the broker has it
                nbytes += len(payload)
        else:
            latencies, nbytes = published
            for msg in msgs:
                self.sub.ack(msg)
            self.counts["results.published_by_cloud"] += len(frames)
        self.offload.on_answers(latencies)
        latency = metrics.child(metrics.E2E_LATENCY, tier)
        outcomes: collections.Counter[str] = collections.Counter()
        for frame, cls, latency_ms in zip(frames, classes, latencies, strict=True):
            latency.observe(latency_ms / 1000.0)
            if frame.label is not None:
                outcomes["correct" if int(cls) == frame.label else "wrong"] += 1
        metrics.child(metrics.PAYLOAD_BYTES, "edge_to_device").inc(nbytes)
        for outcome, n in outcomes.items():
            metrics.child(metrics.PREDICTIONS, tier, outcome).inc(n)
            self.counts[f"{tier}.{outcome}"] += n
        metrics.child(metrics.RESULTS, tier, "true" if degraded else "false").inc(len(frames))
        self.counts[f"results.{tier}" + (".degraded" if degraded else "")] += len(frames)


def rss_bytes() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
