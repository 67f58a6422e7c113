"""The tail side of a split, without MQTT: tensor frames decoded and checked (edge_workers.tensor_ingest), tails and
edge heads by cut id (edge_workers.split_runner, cloud_workers.tail), and the device's head runner (publishers.head)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from cloud_workers.tail import TailRunner
from edge_workers.runtime import load_runtime
from edge_workers.split_runner import EdgeHead, PartRunner, UnknownCutError
from edge_workers.tensor_ingest import TENSOR_REASONS, TensorIngest, group
from modelstore.interface import to_input
from modelstore.partition_files import save_manifest, write_partition
from modelstore.partition_pq import add_pq
from publishers import tensor_codec as tc
from publishers import topics, wire
from publishers.datasets import load_mnist
from publishers.errors import ConfigError, FrameDecodeError
from publishers.head import load_head, resolve_head
from tests.conftest import DATA_DIR, REPO

EDGE_CNN = REPO / "models" / "edge_cnn.onnx"
CODECS = ("float32", "float16", "int8")  # offered at the cuts; int8-channel is deliberately not


def _load(key, path):
    rt = load_runtime(key, path, threads=1)
    rt.warmup()
    return rt


@pytest.fixture(scope="module")
def test_split():
    return load_mnist(DATA_DIR, "test")


@pytest.fixture(scope="module")
def partition(tmp_path_factory):
    """edge_cnn cut at pool2 and fc1 (codecs float32, float16, int8, pq8 with dsub 4 trained on 2,000 train
    images, as `edgeq partition --pq`)."""
    out = tmp_path_factory.mktemp("edge_cnn_parts")
    manifest = write_partition(EDGE_CNN, out, ["pool2", "fc1"], CODECS)
    add_pq(manifest, out, _load, load_mnist(DATA_DIR, "train").images[:2000], dsub=4)
    save_manifest(out, manifest)
    return out, out / "edge_cnn.partition.json", manifest


@pytest.fixture(scope="module")
def whole():
    return _load("onnx", str(EDGE_CNN))


def _frames(path, codec, images, labels, device="dev0"):
    head = load_head(path, codec=codec)
    return [head.encode(wire.Frame(device, i, 1000 + i, images[i], int(labels[i]))) for i in range(len(images))]


def test_device_head_frames_decode_to_the_whole_models_classes(partition, whole, test_split):
    out, manifest_path, manifest = partition
    ingest = TensorIngest.from_manifest(manifest_path)
    tails = TailRunner(manifest_path)
    images, labels = test_split.images[:200], test_split.labels[:200]
    ref = whole.predict(to_input(images)).argmax(axis=1)
    for cut in ("pool2", "fc1"):
        for codec in (*CODECS, "pq8"):
            payloads = _frames(out / f"edge_cnn@{cut}.head.onnx", codec, images, labels)
            size = manifest["cuts"][0 if cut == "pool2" else 1]["codecs"][codec]["frame_bytes"]
            assert {len(p) for p in payloads} == {size}  # the manifest's exact bytes per frame from dev0
            items, rejected = ingest.decode_many(payloads)
            assert not rejected
            (batch,) = group(items).values()
            assert batch.cut_id == f"edge_cnn@{cut}" and batch.x.dtype == np.float32
            assert batch.x.shape == (200, *manifest["cuts"][0 if cut == "pool2" else 1]["shape"])
            assert [f.seq for f in batch.frames] == list(range(200)) and batch.nbytes == 200 * size
            classes, _ = tails.classify(batch.cut_id, batch.x)
            agree = float((classes == ref).mean())
            # observed: 1.0 for float32/float16/int8 at both cuts; pq8 1.0 at pool2, 0.99 at fc1
            assert agree == 1.0 if codec != "pq8" else agree >= 0.97, (cut, codec, agree)


def _patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


def _bad_frames(out, test_split):
    """reason -> one malformed tensor frame (bytes) for the cut edge_cnn@pool2 served from `out`."""
    head = load_head(out / "edge_cnn@pool2.head.onnx", codec="int8")
    good = head.tensor_frame(wire.Frame("dev0", 7, 0, test_split.images[0], 7))
    enc = wire.encode_tensor
    scale_at = wire.TENSOR_HEADER_SIZE + 4 * 3 + len(good.cut_id) + len("dev0")
    f16 = load_head(out / "edge_cnn@pool2.head.onnx", codec="float16").tensor_frame(good_pixels(test_split))
    pq = load_head(out / "edge_cnn@fc1.head.onnx", codec="pq8").tensor_frame(good_pixels(test_split))
    codes = np.array(f16.codes)
    codes.flat[5] = np.float16("inf")
    pq_codes = np.array(pq.codes)
    pq_codes.flat[0] = 255  # K = 256 would take it: patched below to a codebook with fewer words
    return {
        "unknown_cut": enc(_replace(good, cut_id="edge_cnn@pool9")),
        "unknown_cut/hash": enc(_replace(good, model_hash=b"\x00" * 8)),
        "cut_shape": enc(_replace(good, shape=(32, 4, 2), codes=good.codes[:, :, :2])),
        "cut_codec": enc(wire.tensor_frames(good.values()[None], "int8-channel",
                                            tc.CutSpec(good.cut_id, good.model_hash, good.shape,
                                                       ("int8-channel",)), "dev0", 7, 0)[0]),
        "bad_scale": _patched(enc(good), scale_at, struct.pack("<f", 0.0)),
        "bad_scale/nan": _patched(enc(good), scale_at, struct.pack("<f", float("nan"))),
        "non_finite": enc(_replace(f16, codes=codes)),
        "non_finite/overflow": _patched(enc(good), scale_at, struct.pack("<f", 3e38)),
        "short_header": enc(good)[:50],
        "bad_code": enc(_replace(pq, codes=pq_codes)),
    }


def good_pixels(test_split):
    return wire.Frame("dev0", 8, 0, test_split.images[1], 2)


def _replace(frame: wire.TensorFrame, **changes) -> wire.TensorFrame:
    fields = {k: getattr(frame, k) for k in wire.TensorFrame.__dataclass_fields__}
    return wire.TensorFrame(**{**fields, **changes})


def test_malformed_frames_rejected_with_the_specific_reason_good_ones_between_answered(partition, whole,
                                                                                        test_split):
    out, manifest_path, _ = partition
    tails = TailRunner(manifest_path)
    # A codebook of fewer than 256 words, so that code 255 is out of range (reason bad_code).
    pq = tails.ingest.codebooks["edge_cnn@fc1"]
    tails.ingest.codebooks["edge_cnn@fc1"] = tc.PQCodebook(pq.centroids[:, :200])
    bad = _bad_frames(out, test_split)
    good = _frames(out / "edge_cnn@pool2.head.onnx", "int8", test_split.images[:len(bad) + 1],
                   test_split.labels[:len(bad) + 1], device="dev1")
    payloads, expect = [], {}
    for i, (name, data) in enumerate(bad.items()):
        payloads.append(good[i])
        expect[len(payloads)] = name.split("/")[0]
        payloads.append(data)
    payloads.append(good[-1])
    answer = tails.answer(payloads)
    assert answer.rejected == expect
    assert set(answer.rejected.values()) <= set(TENSOR_REASONS)
    ok = [i for i in range(len(payloads)) if i not in expect]
    ref = whole.predict(to_input(test_split.images[:len(bad) + 1])).argmax(axis=1)
    assert answer.classes[ok].tolist() == ref.tolist() and answer.answered == len(good)
    assert (answer.classes[list(expect)] == -1).all()
    assert dict(tails.ingest.rejected) == {r: list(expect.values()).count(r) for r in set(expect.values())}


def test_topic_must_name_the_frames_device(partition, test_split):
    out, manifest_path, _ = partition
    ingest = TensorIngest.from_manifest(manifest_path, ["pool2"])
    (data,) = _frames(out / "edge_cnn@pool2.head.onnx", "int8", test_split.images[:1], test_split.labels[:1])
    assert ingest.decode(data, topics.tensors("dev0")).frame.device_id == "dev0"
    for topic in (topics.tensors("dev1"), topics.frames("dev0")):
        with pytest.raises(FrameDecodeError, match="topic") as err:
            ingest.decode(data, topic)
        assert err.value.reason == "topic_mismatch"
    (fc1,) = _frames(out / "edge_cnn@fc1.head.onnx", "int8", test_split.images[:1], test_split.labels[:1])
    with pytest.raises(FrameDecodeError, match="edge_cnn@fc1.*known: edge_cnn@pool2") as err:
        ingest.decode(fc1)  # served cuts only: fc1 is not one of this ingest's
    assert err.value.reason == "unknown_cut"


def test_tail_runner_errors_name_the_cut_and_the_shapes(partition):
    _, manifest_path, _ = partition
    tails = TailRunner(manifest_path, ["edge_cnn@pool2"])
    assert tails.cuts == ("edge_cnn@pool2",)
    with pytest.raises(UnknownCutError, match="'edge_cnn@fc1' is not served here; served cuts: edge_cnn@pool2"):
        tails.predict("edge_cnn@fc1", np.zeros((1, 128), np.float32))
    with pytest.raises(ValueError, match=r"takes \[N, 32, 4, 4\], got \[2, 512\]"):
        tails.predict("edge_cnn@pool2", np.zeros((2, 512), np.float32))
    assert tails.predict("edge_cnn@pool2", np.zeros((3, 32, 4, 4), np.float32)).shape == (3, 10)
    with pytest.raises(ValueError, match="no cut.*relu9"):
        TailRunner(manifest_path, ["relu9"])


def test_edge_head_encodes_the_cloud_hop_with_exact_bytes(partition, whole, test_split):
    _, manifest_path, _ = partition
    head = EdgeHead(manifest_path, "pool2", codec="int8")
    frames = [wire.Frame(f"cam{i % 3}", i, 5, test_split.images[i], int(test_split.labels[i])) for i in range(64)]
    payloads = head.encode(test_split.images[:64], frames)
    assert [len(p) for p in payloads] == [head.frame_bytes(f.device_id) for f in frames]
    assert head.frame_bytes("dev0") == 590  # docs/partition.md: edge_cnn@pool2, int8, from dev0
    answer = TailRunner(manifest_path, ["pool2"]).answer(payloads)
    assert not answer.rejected
    assert answer.classes.tolist() == whole.predict(to_input(test_split.images[:64])).argmax(axis=1).tolist()
    assert [(f.device_id, f.seq, f.label) for f in answer.frames] == [(f.device_id, f.seq, f.label) for f in frames]
    with pytest.raises(ValueError, match="offers float32, float16, int8, pq8, not 'int8-channel'"):
        EdgeHead(manifest_path, "pool2", codec="int8-channel")
    assert PartRunner(manifest_path, "head").cuts == ("edge_cnn@pool2", "edge_cnn@fc1")


def test_device_head_refuses_what_it_cannot_run(partition, tmp_path):
    out, manifest_path, _ = partition
    with pytest.raises(ConfigError, match="name the cut with --cut"):
        resolve_head(manifest_path)
    assert resolve_head(manifest_path, "fc1").cut.cut_id == "edge_cnn@fc1"
    with pytest.raises(ConfigError, match="no cut 'relu2'; its cuts: edge_cnn@pool2, edge_cnn@fc1"):
        resolve_head(manifest_path, "relu2")
    with pytest.raises(ConfigError, match="head of cut edge_cnn@pool2, --cut says 'fc1'"):
        resolve_head(out / "edge_cnn@pool2.head.onnx", "fc1")
    with pytest.raises(ConfigError, match="offers the codecs float32, float16, int8, pq8, not 'int8-channel'"):
        load_head(out / "edge_cnn@pool2.head.onnx", codec="int8-channel")
    with pytest.raises(ConfigError, match="must be a <cut id>.head.onnx file"):
        resolve_head(EDGE_CNN)
    # A head file that is not the manifest's (another partition of the same cut): refused by sha256.
    other = tmp_path / "other"
    write_partition(EDGE_CNN, other, ["pool2"], CODECS)
    (other / "edge_cnn@pool2.head.onnx").write_bytes((out / "edge_cnn@fc1.head.onnx").read_bytes())
    with pytest.raises(ConfigError, match="sha256 differs"):
        resolve_head(other / "edge_cnn@pool2.head.onnx")
    # A Q-CNN head with PQ layers needs the edge tier's qcnn runtime; one before them runs on onnxruntime.
    qdir = tmp_path / "qcnn"
    write_partition(REPO / "models" / "edge_cnn.qcnn.onnx", qdir, ["pool1", "pool2"], CODECS)
    with pytest.raises(ConfigError, match="1 Q-CNN layer.*take a cut before the first PQ layer"):
        load_head(qdir / "edge_cnn.qcnn@pool2.head.onnx")
    assert load_head(qdir / "edge_cnn.qcnn@pool1.head.onnx").frame_bytes == wire.tensor_frame_size(
        "int8", (16, 12, 12), "edge_cnn.qcnn@pool1", "dev0")
