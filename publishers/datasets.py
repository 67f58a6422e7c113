"""Reading labelled image datasets in the IDX format (MNIST and its subsets)."""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from publishers.errors import DatasetError

logger = logging.getLogger(__name__)

# IDX type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# File name prefixes, tried in order, for each split. The bundled subset uses
# the first name; a user's full MNIST download uses the second.
SPLIT_PREFIXES = {
    "train": ("train-10k", "train"),
    "test": ("test-3k", "t10k"),
}


@dataclass(frozen=True)
class LabelledImages:
    """A dataset split.

    images: uint8 [N, H, W], 0 = background. labels: uint8 [N], class ids.
    """

    images: np.ndarray
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed when the name ends in .gz).

    Returns the array in native byte order with the shape the header states.
    Raises DatasetError naming the file and the problem: bad magic, unknown
    type code, truncated or oversized payload.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: file not found") from err
    except (OSError, EOFError) as err:  # gzip raises these for corrupt streams
        raise DatasetError(f"{path}: cannot read: {err}") from err

    if len(raw) < 4:
        raise DatasetError(f"{path}: truncated header: {len(raw)} bytes, need at least 4")
    if raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: bad magic {raw[:4].hex()}: IDX files start with two zero bytes")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX type code 0x{type_code:02x}")
    if ndim == 0:
        raise DatasetError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(f"{path}: truncated header: {len(raw)} bytes, need {header_len} for {ndim} dims")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        kind = "truncated" if actual < expected else "trailing bytes"
        raise DatasetError(
            f"{path}: {kind}: header says shape {shape} ({expected} bytes), payload has {actual}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def _find(data_dir: Path, prefix: str, kind: str) -> Path | None:
    for suffix in (".gz", ""):
        candidate = data_dir / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte{suffix}"
        if candidate.exists():
            return candidate
    return None


def load_mnist(data_dir: str | Path, split: str) -> LabelledImages:
    """Load the `train` or `test` split of an MNIST-style directory.

    Reads the bundled subset names (`train-10k-*`, `test-3k-*`) or the
    standard full-MNIST names (`train-*`, `t10k-*`), gzip-compressed or not.
    """
    if split not in SPLIT_PREFIXES:
        raise ValueError(f"split must be one of {sorted(SPLIT_PREFIXES)}, got {split!r}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: not a directory (pass --data-dir pointing at MNIST IDX files)")
    for prefix in SPLIT_PREFIXES[split]:
        images_path = _find(data_dir, prefix, "images")
        labels_path = _find(data_dir, prefix, "labels")
        if images_path and labels_path:
            break
    else:
        names = " or ".join(f"{p}-images-idx3-ubyte[.gz]" for p in SPLIT_PREFIXES[split])
        raise DatasetError(f"{data_dir}: no {split} split found (looked for {names} and matching labels)")

    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{images_path}: expected uint8 [N, H, W] images, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetError(f"{labels_path}: expected uint8 [N] labels, got {labels.dtype} {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{data_dir}: count mismatch: {images.shape[0]} images in {images_path.name}, "
            f"{labels.shape[0]} labels in {labels_path.name}"
        )
    logger.debug("loaded %d %s images from %s", len(labels), split, images_path)
    return LabelledImages(images=images, labels=labels, source=str(images_path))
