"""The edge's per-batch work on whole numpy batches: check, denoise, classify, route, encode the uplink.

No MQTT and no Ray here, so the stages can be tested and benchmarked alone;
`edge_workers.worker` wraps this in a Ray actor with an MQTT client.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from edge_workers import metrics
from edge_workers.codecs import UplinkCodec
from edge_workers.config import EdgeConfig
from edge_workers.denoise import DenoiseConfig, Denoiser
from edge_workers.reduce import PCA_FILE, PCAModel
from edge_workers.routing import confidence
from edge_workers.runtime import load_runtime, models_dir
from publishers.errors import EdgeqError
from publishers.wire import Frame

logger = logging.getLogger(__name__)

class FrameRejected(EdgeqError, ValueError):
    """A decoded frame the edge model cannot take; `reason` is a bounded metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def frame_pixels(frame: Frame, shape: tuple[int, int]) -> np.ndarray:
    """The frame as uint8 [H, W]. uint8 pixels pass as they are; float pixels must be finite, in [0, 1].

    Raises FrameRejected (reason `wrong_shape`, `non_finite`, `out_of_range`, `unsupported_dtype`).
    """
    px = frame.pixels
    if px.shape not in (shape, (1, *shape)):
        raise FrameRejected("wrong_shape", f"{frame.device_id}#{frame.seq}: expected pixels {list(shape)}, "
                                           f"got {list(px.shape)}")
    px = px.reshape(shape)
    if px.dtype == np.uint8:
        return px
    if px.dtype.kind == "f":
        if not np.isfinite(px).all():
            raise FrameRejected("non_finite", f"{frame.device_id}#{frame.seq}: NaN or Inf in float pixels")
        if px.min() < 0.0 or px.max() > 1.0:
            raise FrameRejected("out_of_range", f"{frame.device_id}#{frame.seq}: float pixels must be in [0, 1], "
                                                f"got [{px.min():.3g}, {px.max():.3g}]")
        return np.rint(px.astype(np.float32) * 255.0).astype(np.uint8)
    raise FrameRejected("unsupported_dtype", f"{frame.device_id}#{frame.seq}: pixels of dtype {px.dtype} are not "
                                             "supported (uint8, or float in [0, 1])")


@dataclass
class BatchDecision:
    """What the edge decided for one batch of N frames."""

    classes: np.ndarray        # int64 [N], edge prediction
    confidences: np.ndarray    # float32 [N], 1 - normalised entropy
    to_cloud: np.ndarray       # bool [N]
    uplink: np.ndarray         # uint8 [n_cloud, code_size], payloads of the frames going to the cloud
    seconds: dict[str, float] = field(default_factory=dict)  # per stage


class EdgeProcessor:
    """Denoise -> classify -> route -> encode, for batches of uint8 [N, H, W] frames."""

    def __init__(self, cfg: EdgeConfig):
        self.cfg = cfg
        # frames with confidence below it go to the cloud; set at run time by the offload loop
        self.threshold = cfg.threshold
        mdir = models_dir(cfg.models_dir)
        pca = PCAModel.load(mdir / PCA_FILE)
        self.denoiser = Denoiser(DenoiseConfig(method=cfg.denoise), pca)
        self.codec = UplinkCodec(cfg.codec, denoiser=self.denoiser, pca=pca, k=cfg.pca_components)
        self.frame_shape = tuple(pca.image_shape)
        self.model_key = f"edge-{cfg.runtime}"
        self.runtime = load_runtime(cfg.runtime, mdir / cfg.model, threads=cfg.threads)
        if tuple(self.runtime.input_shape) != (1, *self.frame_shape):
            raise ValueError(f"edge model {cfg.model} takes {list(self.runtime.input_shape)}, frames are "
                             f"{list(self.frame_shape)}")
        self.runtime.warmup()

    def classify(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Edge model on frames: uint8 [N, H, W] (denoised here first) or denoised float32 [N, H, W] in [0, 1].

        Returns (classes int64 [N], confidence float32 [N]).
        """
        if frames.dtype == np.uint8:
            frames = self.denoiser.apply(frames)
        t0 = time.perf_counter()
        logits = self.runtime.predict(frames[:, None, :, :])
        metrics.child(metrics.INFERENCE_SECONDS, self.model_key).observe(time.perf_counter() - t0)
        return logits.argmax(axis=1).astype(np.int64), confidence(logits)

    def process(self, images: np.ndarray) -> BatchDecision:
        """images: uint8 [N, H, W] -> BatchDecision."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 3 or images.shape[1:] != self.frame_shape:
            raise ValueError(f"expected frames [N, {self.frame_shape[0]}, {self.frame_shape[1]}], "
                             f"got {list(images.shape)}")
        n = len(images)
        policy = self.cfg.policy
        t0 = time.perf_counter()
        # cloud-only with the raw codec uses neither the edge model nor denoised frames: skip the denoiser
        # (measured on a busy 2-core host: 8.6 -> 0.03 ms per 64-frame cloud-only batch).
        denoised = None if policy == "cloud-only" and self.codec.name == "raw" else self.denoiser.apply(images)
        t1 = time.perf_counter()
        if policy == "cloud-only":
            classes, conf = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.float32)
        else:
            classes, conf = self.classify(denoised)
        t2 = time.perf_counter()
        if policy == "edge-only":
            to_cloud = np.zeros(n, dtype=bool)
        elif policy == "cloud-only":
            to_cloud = np.ones(n, dtype=bool)
        else:
            to_cloud = conf < self.threshold
        if to_cloud.any():
            everything = bool(to_cloud.all())  # cloud-only: no copies of the whole batch
            uplink = self.codec.compute_codes(
                images if everything else images[to_cloud],
                denoised=denoised if everything or denoised is None else denoised[to_cloud])
        else:
            uplink = np.zeros((0, self.codec.code_size), dtype=np.uint8)
        t3 = time.perf_counter()
        seconds = {"denoise": t1 - t0, "classify": t2 - t1, "encode": t3 - t2}
        metrics.child(metrics.STAGE_SECONDS, "denoise").observe(seconds["denoise"])
        metrics.child(metrics.STAGE_SECONDS, "encode").observe(seconds["encode"])
        return BatchDecision(classes, conf, to_cloud, np.ascontiguousarray(uplink), seconds)
