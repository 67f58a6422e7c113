"""Frame sources and sensor noise: dataset striping, directories, the camera's clear errors."""

from __future__ import annotations

import itertools
import types
from pathlib import Path

import numpy as np
import pytest

from publishers import sources
from publishers.config import PublishConfig
from publishers.datasets import load_mnist
from publishers.errors import SourceError
from publishers.noise import NoiseConfig, add_noise
from tests.conftest import DATA_DIR


def test_devices_replay_disjoint_slices_and_loop() -> None:
    data = load_mnist(DATA_DIR, "test")
    firsts = [[label for _, label in itertools.islice(sources.DatasetSource(data, i, 3).samples(), 4)]
              for i in range(3)]
    assert firsts == [data.labels[i::3][:4].tolist() for i in range(3)]
    once = list(sources.DatasetSource(data, 2, 3, loop=False).samples())
    assert len(once) == 1000
    looped = list(itertools.islice(sources.DatasetSource(data, 2, 3).samples(), 1001))
    assert np.array_equal(looped[1000][0], looped[0][0])


def test_directory_source_reads_npy_and_pgm(tmp_path: Path) -> None:
    a = np.arange(784, dtype=np.uint8).reshape(28, 28)
    np.save(tmp_path / "a.npy", a)
    (tmp_path / "b.pgm").write_bytes(b"P5\n# a comment\n28 28\n255\n" + a[::-1].tobytes())
    (tmp_path / "notes.txt").write_text("ignored")
    got = list(sources.DirectorySource(tmp_path, (28, 28)).samples())
    assert len(got) == 2 and np.array_equal(got[0][0], a) and np.array_equal(got[1][0], a[::-1])
    assert got[0][1] is None


def test_directory_source_reads_images_as_grey_and_resizes(tmp_path: Path) -> None:
    from PIL import Image

    rgb = np.zeros((56, 56, 3), dtype=np.uint8)
    rgb[:28, :, 0] = 255  # top half red
    Image.fromarray(rgb).save(tmp_path / "frame.png")
    (pixels, label), = list(sources.DirectorySource(tmp_path, (28, 28)).samples())
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8 and label is None
    assert int(pixels[0, 0]) == 76 and int(pixels[-1, -1]) == 0  # Pillow's luma of pure red: 76


def test_images_without_pillow_name_the_extra(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "frame.png").write_bytes(b"not read")
    monkeypatch.setattr(sources, "_optional", lambda name: None)  # Pillow not importable
    with pytest.raises(SourceError, match=r"needs Pillow \(pip install 'edgeq\[pi\]'\)"):
        sources.DirectorySource(tmp_path, (28, 28))


def test_directory_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        sources.DirectorySource(tmp_path / "missing", (28, 28))
    with pytest.raises(SourceError, match="has no .npy/.pgm/.png"):
        sources.DirectorySource(tmp_path, (28, 28))
    np.save(tmp_path / "wrong.npy", np.zeros((10, 10), dtype=np.float32))
    with pytest.raises(SourceError, match=r"expected uint8 \(28, 28\), got float32 \(10, 10\)"):
        next(sources.DirectorySource(tmp_path, (28, 28)).samples())
    (tmp_path / "short.pgm").write_bytes(b"P5 28 28 255\n" + bytes(10))
    with pytest.raises(SourceError, match="784 bytes, file has 10"):
        sources.read_pgm(tmp_path / "short.pgm")


def test_camera_without_picamera2_or_opencv_names_the_extra(monkeypatch) -> None:
    monkeypatch.setattr(sources, "_optional", lambda name: None)  # neither package importable
    with pytest.raises(SourceError, match=r"python3-picamera2.*edgeq\[pi\]"):
        sources.CameraSource((28, 28))


def test_camera_frames_are_grey_and_resized(monkeypatch) -> None:
    """A stand-in for OpenCV's VideoCapture: there is no camera on this machine."""
    bgr = np.zeros((56, 56, 3), dtype=np.uint8)
    bgr[:, :, 1] = 200

    class FakeCapture:
        def __init__(self, index): self.index = index
        def isOpened(self): return True
        def read(self): return True, bgr

    fake_cv2 = types.SimpleNamespace(
        VideoCapture=FakeCapture, INTER_AREA=3,
        resize=lambda img, size, interpolation: img[::2, ::2][: size[1], : size[0]],
    )
    monkeypatch.setattr(sources, "_optional", lambda name: fake_cv2 if name == "cv2" else None)
    frame, label = next(sources.CameraSource((28, 28)).samples())
    assert frame.shape == (28, 28) and frame.dtype == np.uint8 and label is None
    assert int(frame[0, 0]) == int(200 * 0.587)


def test_make_source_requires_directory_option() -> None:
    with pytest.raises(SourceError, match="needs publish.directory"):
        sources.make_source(PublishConfig(source="directory"), 0)


def test_gaussian_noise_has_the_configured_sigma() -> None:
    grey = np.full((200, 200), 128, dtype=np.uint8)
    noisy = add_noise(grey, NoiseConfig("gaussian", 0.1), np.random.default_rng(1))
    sigma = (noisy.astype(float) - 128).std()
    assert abs(sigma - 25.5) < 0.5  # observed 25.5 on 40,000 pixels
    again = add_noise(grey, NoiseConfig("gaussian", 0.1), np.random.default_rng(1))
    assert np.array_equal(noisy, again)


def test_salt_and_pepper_hits_the_configured_fraction() -> None:
    grey = np.full((200, 200), 128, dtype=np.uint8)
    noisy = add_noise(grey, NoiseConfig("salt-and-pepper", 0.05), np.random.default_rng(2))
    hit = noisy != 128
    assert abs(hit.mean() - 0.05) < 0.005  # observed ~0.050
    assert set(np.unique(noisy[hit])) == {0, 255}
    assert np.array_equal(add_noise(grey, NoiseConfig(), np.random.default_rng(0)), grey)


def test_noise_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="noise kind"):
        NoiseConfig("speckle")
    with pytest.raises(ValueError, match=r"noise level must be in \[0, 1\]"):
        NoiseConfig("gaussian", 1.5)
    with pytest.raises(ValueError, match="expects uint8"):
        add_noise(np.zeros((2, 2), np.float32), NoiseConfig("gaussian"), np.random.default_rng(0))
