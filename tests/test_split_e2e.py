"""Device/edge split end to end through a real Mosquitto: devices run a partition's head (`publish(... head=...)`) and
publish tensor frames; a consumer on the tensor topic decodes and checks them (TensorIngest) and runs the tails
(TailRunner). The worker wiring is not involved: this is what it will call."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from cloud_workers.tail import TailRunner
from edge_workers.ingest import Subscriber
from edge_workers.runtime import load_runtime
from edge_workers.tensor_ingest import TensorIngest, group
from modelstore.interface import to_input
from modelstore.partition_files import write_partition
from publishers import topics, wire
from publishers.config import PublishConfig
from publishers.datasets import load_mnist
from publishers.device import Device
from publishers.head import load_head
from publishers.mqtt import MqttConfig
from publishers.run import publish, run_devices
from publishers.sources import DatasetSource
from tests.conftest import DATA_DIR, REPO, collect

DEVICES, COUNT = 2, 500  # 1,000 held-out frames per codec


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """edge_cnn cut at pool2 (codecs float32, float16, int8, int8-channel): (out dir, manifest path, manifest)."""
    out = tmp_path_factory.mktemp("split_e2e")
    manifest = write_partition(REPO / "models" / "edge_cnn.onnx", out, ["pool2"])
    return out, out / "edge_cnn.partition.json", manifest


@pytest.fixture(scope="module")
def test_split():
    return load_mnist(DATA_DIR, "test")


@pytest.fixture(scope="module")
def whole_classes(test_split):
    """The whole edge CNN's class for every held-out image (the reference the split must reproduce)."""
    rt = load_runtime("onnx", str(REPO / "models" / "edge_cnn.onnx"))
    return rt.predict(to_input(test_split.images)).argmax(axis=1)


def _image_index(device_id: str, seq: int) -> int:
    """Device i of DEVICES replays held-out images i, i + DEVICES, ... (publishers.sources.DatasetSource)."""
    return int(device_id.removeprefix("dev")) + DEVICES * seq


def _consume(mqtt_cfg: MqttConfig, client_id: str):
    sub = Subscriber(mqtt_cfg, client_id, topic_filter=topics.TENSORS_FILTER).start()
    sub.wait_subscribed()
    return sub


@pytest.mark.parametrize("codec", ["float32", "float16", "int8"])
def test_device_heads_and_tails_give_the_whole_models_answers(codec, parts, mqtt_cfg, test_split, whole_classes):
    out, manifest_path, manifest = parts
    tails = TailRunner(manifest_path)
    sub = _consume(mqtt_cfg, f"test-tensors-{codec}")
    cfg = PublishConfig(devices=DEVICES, count=COUNT, rate_hz=0, data_dir=str(DATA_DIR),
                        head=str(out / "edge_cnn@pool2.head.onnx"), tensor_codec=codec)
    report = publish(mqtt_cfg, cfg)
    msgs = collect(sub, DEVICES * COUNT, timeout=60)
    sub.stop()

    frame_bytes = manifest["cuts"][0]["codecs"][codec]["frame_bytes"]  # from dev0; dev1 has as many characters
    assert report.total("acked") == DEVICES * COUNT and not report.dropped
    assert report.bytes_per_frame == frame_bytes  # 2122 / 1098 / 590 B against 828 for the pixel frame
    assert f"({frame_bytes:.1f} per frame)" in report.summary() and "head edge_cnn@pool2" in report.summary()
    items, rejected = tails.ingest.decode_many(msgs)  # topic checked against each frame's device id
    assert not rejected
    seen = {(i.frame.device_id, i.frame.seq) for i in items}
    assert seen == {(f"dev{d}", s) for d in range(DEVICES) for s in range(COUNT)}, "frames lost"
    assert len(items) == DEVICES * COUNT  # and none twice
    (batch,) = group(items).values()
    classes, _ = tails.classify(batch.cut_id, batch.x)
    idx = np.array([_image_index(f.device_id, f.seq) for f in batch.frames])
    assert [f.label for f in batch.frames] == test_split.labels[idx].tolist()
    labels, ref = test_split.labels[idx], whole_classes[idx]
    split_acc, whole_acc = 100 * float((classes == labels).mean()), 100 * float((ref == labels).mean())
    if codec == "int8":
        assert abs(split_acc - whole_acc) <= 0.3, (split_acc, whole_acc)  # observed: 99.30 % both
    else:
        assert classes.tolist() == ref.tolist()  # every frame's class, so the accuracy too
    assert batch.nbytes == DEVICES * COUNT * frame_bytes


def _bad_encoder(head):
    """A device encoder that sends a malformed tensor frame at some seqs: seq -> reason, and the encoder."""
    good = head.encode

    def shape(frame):
        tf = head.tensor_frame(frame)
        return wire.encode_tensor(_replace(tf, shape=(32, 4, 2), codes=tf.codes[:, :, :2]))

    def scale(frame):
        data = good(frame)
        at = wire.TENSOR_HEADER_SIZE + 4 * 3 + len(head.cut_id) + len(frame.device_id)
        return data[:at] + b"\x00\x00\x00\x00" + data[at + 4:]  # int8 scale 0.0

    def cut(frame):
        return wire.encode_tensor(_replace(head.tensor_frame(frame), cut_id="edge_cnn@pool9"))

    def model(frame):
        return wire.encode_tensor(_replace(head.tensor_frame(frame), model_hash=bytes(8)))

    bad = {7: ("cut_shape", shape), 19: ("bad_scale", scale), 20: ("unknown_cut", cut), 33: ("unknown_cut", model),
           48: ("cut_shape", shape)}

    def encode(frame: wire.Frame) -> bytes:
        return bad[frame.seq][1](frame) if frame.seq in bad else good(frame)

    return {seq: reason for seq, (reason, _) in bad.items()}, encode


def _replace(frame: wire.TensorFrame, **changes) -> wire.TensorFrame:
    fields = {k: getattr(frame, k) for k in wire.TensorFrame.__dataclass_fields__}
    return wire.TensorFrame(**{**fields, **changes})


def test_malformed_tensor_frames_rejected_by_reason_good_ones_between_answered(parts, mqtt_cfg, test_split,
                                                                               whole_classes):
    out, manifest_path, _ = parts
    head = load_head(out / "edge_cnn@pool2.head.onnx", codec="int8")
    expected_bad, encoder = _bad_encoder(head)
    tails = TailRunner(manifest_path)
    ingest = TensorIngest.from_manifest(manifest_path)
    sub = _consume(mqtt_cfg, "test-tensors-bad")
    cfg = PublishConfig(devices=1, count=60, rate_hz=0, data_dir=str(DATA_DIR))
    device = Device("dev0", DatasetSource(test_split), mqtt_cfg, cfg, np.random.default_rng(0), encoder=encoder,
                    topic=topics.tensors("dev0"))  # replays held-out image `seq` as frame `seq`
    report = run_devices([device])
    msgs = collect(sub, 60, timeout=30)
    sub.stop()

    assert report.total("acked") == 60 and len(msgs) == 60
    items, rejected = ingest.decode_many(msgs)
    # The sequence number sits at bytes 16..23 of every frame, whatever else is wrong with it.
    assert {struct.unpack_from("<Q", m.payload, 16)[0]: e.reason for m, e in rejected} == expected_bad
    assert dict(ingest.rejected) == {"cut_shape": 2, "bad_scale": 1, "unknown_cut": 2}
    assert {i.frame.seq for i in items} == set(range(60)) - set(expected_bad)  # every good frame between them
    (batch,) = group(items).values()
    classes, _ = tails.classify(batch.cut_id, batch.x)
    assert classes.tolist() == whole_classes[[f.seq for f in batch.frames]].tolist()
