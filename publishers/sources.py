"""Frame sources behind one small interface: dataset replay, a directory of files, a camera."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from publishers.config import PublishConfig
from publishers.datasets import LabelledImages, load_mnist
from publishers.errors import SourceError

logger = logging.getLogger(__name__)

Sample = tuple[np.ndarray, "int | None"]  # pixels uint8 [H, W], label or None


class FrameSource(Protocol):
    """Yields (pixels: uint8 [H, W], label: int | None) until exhausted (or forever)."""

    def samples(self) -> Iterator[Sample]: ...


class DatasetSource:
    """Replays a labelled split; device `index` of `stride` takes images index, index+stride, ...

    Devices thus send disjoint frames; with `loop` they wrap around forever.
    """

    def __init__(self, data: LabelledImages, index: int = 0, stride: int = 1, loop: bool = True) -> None:
        if not 0 <= index < stride:
            raise ValueError(f"need 0 <= index < stride, got index={index}, stride={stride}")
        if index >= len(data):
            raise SourceError(f"device {index} has no frames: the split has only {len(data)} images")
        self.data, self.index, self.stride, self.loop = data, index, stride, loop

    def samples(self) -> Iterator[Sample]:
        while True:
            for i in range(self.index, len(self.data), self.stride):
                yield self.data.images[i], int(self.data.labels[i])
            if not self.loop:
                return


def read_pgm(path: Path) -> np.ndarray:
    """Read a binary 8-bit PGM (P5) file as uint8 [H, W]."""
    raw = path.read_bytes()
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while pos < len(raw) and raw[pos : pos + 1].isspace():
            pos += 1
        if raw[pos : pos + 1] == b"#":
            pos = raw.find(b"\n", pos) + 1 or len(raw)
            continue
        end = pos
        while end < len(raw) and not raw[end : end + 1].isspace():
            end += 1
        if end == pos:
            raise SourceError(f"{path}: truncated PGM header")
        fields.append(raw[pos:end])
        pos = end
    magic, width, height, maxval = fields
    if magic != b"P5" or maxval != b"255":
        raise SourceError(f"{path}: only binary 8-bit PGM (P5, maxval 255) is supported, got {magic!r}/{maxval!r}")
    h, w = int(height), int(width)
    pixels = raw[pos + 1 : pos + 1 + h * w]
    if len(pixels) != h * w:
        raise SourceError(f"{path}: PGM header says {w}x{h} = {h * w} bytes, file has {len(pixels)}")
    return np.frombuffer(pixels, dtype=np.uint8).reshape(h, w)


class DirectorySource:
    """Frames from the files of a directory, in name order.

    `.npy` (uint8 [H, W]) and binary `.pgm` files must already have `shape`;
    `.png`/`.jpg`/`.jpeg`/`.bmp` images are read with Pillow, converted to
    grey and resized to `shape`.
    """

    RAW_SUFFIXES = (".npy", ".pgm")
    IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

    def __init__(self, directory: str | Path, shape: tuple[int, int], loop: bool = False) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise SourceError(f"frame directory {self.directory} does not exist")
        known = self.RAW_SUFFIXES + self.IMAGE_SUFFIXES
        self.files = sorted(p for p in self.directory.iterdir() if p.suffix.lower() in known)
        if not self.files:
            raise SourceError(f"frame directory {self.directory} has no {'/'.join(known)} files")
        self._pil = None
        if any(p.suffix.lower() in self.IMAGE_SUFFIXES for p in self.files):
            self._pil = _optional("PIL.Image")
            if self._pil is None:
                raise SourceError(f"{self.directory} holds image files: "
                                  "reading them needs Pillow (pip install 'edgeq[pi]')")
        self.shape, self.loop = shape, loop

    def load(self, path: Path) -> np.ndarray:
        suffix = path.suffix.lower()
        if suffix in self.IMAGE_SUFFIXES:
            with self._pil.open(path) as image:
                grey = image.convert("L")
                if grey.size != self.shape[::-1]:
                    grey = grey.resize(self.shape[::-1], self._pil.Resampling.BOX)
                return np.asarray(grey, dtype=np.uint8)
        pixels = np.load(path, allow_pickle=False) if suffix == ".npy" else read_pgm(path)
        if pixels.dtype != np.uint8 or pixels.shape != self.shape:
            raise SourceError(f"{path}: expected uint8 {self.shape}, got {pixels.dtype} {pixels.shape}")
        return pixels

    def samples(self) -> Iterator[Sample]:
        while True:
            for path in self.files:
                yield self.load(path), None
            if not self.loop:
                return


class CameraSource:
    """Grey frames from a Raspberry Pi camera (picamera2) or any camera OpenCV opens.

    Frames are converted to grey and resized to `shape`. Without picamera2 or
    OpenCV, construction raises SourceError naming what to install.
    """

    def __init__(self, shape: tuple[int, int], camera_index: int = 0) -> None:
        self.shape = shape
        self._cv2 = _optional("cv2")
        picamera2 = _optional("picamera2")
        if picamera2 is not None:
            self._camera = picamera2.Picamera2()
            self._camera.configure(self._camera.create_still_configuration(main={"format": "RGB888"}))
            self._camera.start()
            self._read = self._camera.capture_array
        elif self._cv2 is not None:
            self._camera = self._cv2.VideoCapture(camera_index)
            if not self._camera.isOpened():
                raise SourceError(f"OpenCV could not open camera {camera_index}")
            self._read = self._read_cv2
        else:
            raise SourceError(
                "the camera source needs picamera2 (sudo apt-get install python3-picamera2) "
                "or OpenCV (pip install 'edgeq[pi]')"
            )

    def _read_cv2(self) -> np.ndarray:
        ok, image = self._camera.read()
        if not ok:
            raise SourceError("camera returned no frame")
        return image

    def grab(self) -> np.ndarray:
        """One frame: uint8 [H, W] of the configured shape."""
        image = np.asarray(self._read())
        if image.ndim == 3:  # RGB/BGR -> luma, channel order does not matter much for grey
            image = image[..., :3].astype(np.float32) @ np.array([0.114, 0.587, 0.299], dtype=np.float32)
        image = np.clip(image, 0, 255).astype(np.uint8)
        if image.shape != self.shape:
            if self._cv2 is None:
                raise SourceError(f"camera gives {image.shape}, need {self.shape}: resizing needs OpenCV")
            image = self._cv2.resize(image, self.shape[::-1], interpolation=self._cv2.INTER_AREA)
        return image

    def samples(self) -> Iterator[Sample]:
        while True:
            yield self.grab(), None


def _optional(module: str):  # noqa: ANN202 - returns a module or None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def load_replay_data(cfg: PublishConfig) -> LabelledImages | None:
    """The dataset split `mnist` sources replay, loaded once for all devices; None for other sources."""
    if cfg.source != "mnist":
        return None
    data = load_mnist(cfg.data_dir or default_data_dir(), cfg.split)
    if cfg.shuffle:  # one seeded order for all devices: the first N frames sent are a random sample of the split
        order = np.random.default_rng(cfg.seed).permutation(len(data))
        data = LabelledImages(data.images[order], data.labels[order], f"{data.source}, shuffled")
    return data


def make_source(cfg: PublishConfig, device_index: int, data: LabelledImages | None = None) -> FrameSource:
    """The source device `device_index` of `cfg.devices` reads from (`data` from load_replay_data)."""
    if cfg.source == "mnist":
        if data is None:
            raise ValueError("source mnist needs the replay data: pass load_replay_data(cfg)")
        return DatasetSource(data, device_index, cfg.devices, loop=True)
    if cfg.source == "directory":
        if not cfg.directory:
            raise SourceError("publish.source=directory needs publish.directory (--directory)")
        return DirectorySource(cfg.directory, cfg.shape(), loop=True)
    return CameraSource(cfg.shape(), camera_index=device_index)


def default_data_dir() -> Path:
    """./data/mnist if present, else the data/mnist of the source checkout edgeq runs from."""
    local = Path("data/mnist")
    if local.is_dir():
        return local
    return Path(__file__).resolve().parents[1] / "data" / "mnist"
