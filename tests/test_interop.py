"""Interop: frames written by a standalone C encoder, published with mosquitto_pub, decoded by edgeq."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_workers.ingest import Subscriber, decode_frame
from infra.broker import MosquittoBroker
from publishers import topics, wire
from publishers.datasets import load_mnist
from publishers.errors import FrameDecodeError
from publishers.mqtt import MqttConfig
from tests.conftest import DATA_DIR, collect

ENCODER_SRC = Path(__file__).resolve().parent / "interop" / "encode_frame.c"
SUBPROCESS_TIMEOUT_S = 30.0
RECEIVE_TIMEOUT_S = 10.0
IMAGE_INDEX = 0  # first test-3k image (MNIST test image 5000), a "3"

pytestmark = pytest.mark.timeout(120)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        # Never skip: CI installs these (scripts/setup.sh test), so absence is a broken machine.
        pytest.fail(f"{name} not found on PATH: install it (`scripts/setup.sh test` does) to run the interop tests")
    return path


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}: {proc.stderr.strip()}"
    return proc


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C encoder, compiled with warnings as errors into a private directory."""
    exe = tmp_path_factory.mktemp("interop") / "encode_frame"
    _run([_tool("gcc"), "-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-O2",
          "-o", str(exe), str(ENCODER_SRC)])
    return exe


@pytest.fixture(scope="module")
def mnist_image() -> tuple[np.ndarray, int]:
    """uint8 [28, 28] MNIST test image and its label."""
    split = load_mnist(DATA_DIR, "test")
    image = np.ascontiguousarray(split.images[IMAGE_INDEX], dtype=np.uint8)
    assert image.shape == (28, 28)
    return image, int(split.labels[IMAGE_INDEX])


@pytest.fixture
def subscriber(mqtt_cfg: MqttConfig) -> Iterator[Subscriber]:
    sub = Subscriber(mqtt_cfg, f"interop-sub-{time.monotonic_ns()}", topic_filter=topics.FRAMES_FILTER)
    sub.start()
    try:
        sub.wait_subscribed()
        yield sub
    finally:
        sub.stop()


def encode_with_c(encoder: Path, out: Path, device_id: str, seq: int, label: int | None, pixels: str) -> bytes:
    """Run the C encoder; `pixels` is a 784-byte file path or "-" for its built-in pattern."""
    _run([str(encoder), str(out), device_id, str(seq), "-1" if label is None else str(label), pixels])
    return out.read_bytes()


def mosquitto_pub(broker: MosquittoBroker, topic: str, path: Path) -> None:
    _run([_tool("mosquitto_pub"), "-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", topic,
          "-f", str(path)])


def c_pattern() -> np.ndarray:
    """The C encoder's built-in pattern: pixel[r][c] = (r * 31 + c * 7) % 256, uint8 [28, 28]."""
    r, c = np.mgrid[0:28, 0:28]
    return ((r * 31 + c * 7) % 256).astype(np.uint8)


def test_c_frame_through_mosquitto_pub_decodes(encoder, mnist_image, broker, subscriber, tmp_path):
    image, label = mnist_image
    pixels = tmp_path / "pixels.raw"
    pixels.write_bytes(image.tobytes())
    frame_file = tmp_path / "frame.bin"

    before_ns = time.time_ns()
    data = encode_with_c(encoder, frame_file, "dev0", 7, label, str(pixels))
    mosquitto_pub(broker, "edgeq/v1/frames/dev0", frame_file)
    got = collect(subscriber, 1, RECEIVE_TIMEOUT_S)
    after_ns = time.time_ns()

    assert len(got) == 1, f"expected 1 frame from mosquitto_pub within {RECEIVE_TIMEOUT_S}s, got {len(got)}"
    msg = got[0]
    assert msg.topic == "edgeq/v1/frames/dev0"
    assert msg.payload == data  # mosquitto_pub -f sends the file unchanged
    assert len(data) == 32 + 2 * 4 + len("dev0") + 784

    frame = decode_frame(msg)
    assert frame.device_id == "dev0"
    assert frame.seq == 7
    assert frame.label == label == 3
    assert frame.flags == wire.FLAG_HAS_LABEL
    assert not frame.noisy
    assert frame.pixels.dtype == np.uint8
    assert frame.pixels.shape == (28, 28)
    np.testing.assert_array_equal(frame.pixels, image)
    # CLOCK_REALTIME in C and time.time_ns() read the same clock: the capture lies between.
    assert before_ns <= frame.capture_ns <= after_ns, (before_ns, frame.capture_ns, after_ns)
    assert frame.capture_ns <= msg.arrival_ns
    assert not subscriber.dropped


@pytest.mark.parametrize(
    ("device_id", "seq", "label", "source"),
    [
        ("dev0", 7, 3, "mnist"),
        ("Cam_01.north-B", 2**64 - 1, None, "pattern"),
        ("x" * 64, 0, 65535, "mnist"),
        ("d", 123456789012345, 0, "pattern"),
    ],
)
def test_c_encoder_matches_python_byte_for_byte(encoder, mnist_image, tmp_path, device_id, seq, label, source):
    if source == "mnist":
        pixels_arr = mnist_image[0]
        pixels_arg = tmp_path / "pixels.raw"
        pixels_arg.write_bytes(pixels_arr.tobytes())
        pixels = str(pixels_arg)
    else:
        pixels_arr, pixels = c_pattern(), "-"

    before_ns = time.time_ns()
    c_bytes = encode_with_c(encoder, tmp_path / "frame.bin", device_id, seq, label, pixels)
    after_ns = time.time_ns()
    capture_ns = int.from_bytes(c_bytes[24:32], "little", signed=True)
    assert before_ns <= capture_ns <= after_ns

    py_bytes = wire.encode(wire.Frame(device_id, seq, capture_ns, pixels_arr, label=label))
    assert c_bytes == py_bytes, _first_difference(c_bytes, py_bytes)

    # Independently of the capture time: every other byte agrees with a frame encoded at t=0.
    py_zero = bytearray(wire.encode(wire.Frame(device_id, seq, 0, pixels_arr, label=label)))
    py_zero[24:32] = c_bytes[24:32]
    assert c_bytes == bytes(py_zero)


def _first_difference(a: bytes, b: bytes) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at byte {i}: C 0x{x:02x}, Python 0x{y:02x}"
    return f"lengths differ: C {len(a)} bytes, Python {len(b)}"


def test_mosquitto_pub_to_another_devices_topic_is_rejected(encoder, broker, subscriber, tmp_path):
    frame_file = tmp_path / "frame.bin"
    data = encode_with_c(encoder, frame_file, "devA", 1, None, "-")
    mosquitto_pub(broker, "edgeq/v1/frames/devB", frame_file)
    got = collect(subscriber, 1, RECEIVE_TIMEOUT_S)

    assert len(got) == 1, f"expected 1 message within {RECEIVE_TIMEOUT_S}s, got {len(got)}"
    assert got[0].topic == "edgeq/v1/frames/devB"
    assert got[0].payload == data
    assert wire.decode(got[0].payload).device_id == "devA"  # the frame itself is well formed
    with pytest.raises(FrameDecodeError) as err:
        decode_frame(got[0])
    assert err.value.reason == "topic_mismatch"
    assert "'devB'" in str(err.value) and "'devA'" in str(err.value)
