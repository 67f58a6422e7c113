"""The IDX loader on the bundled MNIST subset, full-MNIST file names, and malformed files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from publishers.datasets import load_mnist, read_idx
from publishers.errors import DatasetError
from tests.conftest import DATA_DIR


def test_bundled_splits_load_with_expected_shapes() -> None:
    train, test = load_mnist(DATA_DIR, "train"), load_mnist(DATA_DIR, "test")
    assert train.images.shape == (10_000, 28, 28) and train.labels.shape == (10_000,)
    assert test.images.shape == (3_000, 28, 28) and test.labels.shape == (3_000,)
    assert train.images.dtype == np.uint8 and test.labels.dtype == np.uint8
    assert set(np.unique(test.labels)) == set(range(10))
    # the held-out split is not part of the training split
    train_rows = {img.tobytes() for img in train.images}
    assert sum(img.tobytes() in train_rows for img in test.images) == 0


def _write_idx(path: Path, array: np.ndarray, type_code: int = 0x08, gz: bool = False) -> Path:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)
    return path


def test_full_mnist_names_uncompressed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    test = load_mnist(tmp_path, "test")
    assert np.array_equal(test.images, images) and np.array_equal(test.labels, labels)


def test_other_idx_types_round_trip(tmp_path: Path) -> None:
    values = np.array([[1.5, -2.0], [3.25, 0.0]], dtype=np.float32)
    out = read_idx(_write_idx(tmp_path / "f.idx.gz", values, type_code=0x0D, gz=True))
    assert out.dtype == np.float32 and np.array_equal(out, values)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: b"\x01" + raw[1:], "bad magic"),
        (lambda raw: raw[:2] + b"\x07" + raw[3:], "unknown IDX type code 0x07"),
        (lambda raw: raw[:-1], "truncated: header says shape (3, 4, 4) (48 bytes), payload has 47"),
        (lambda raw: raw + b"\x00", "trailing bytes"),
        (lambda raw: raw[:6], "truncated header: 6 bytes, need 16"),
    ],
)
def test_malformed_idx_files_name_the_problem(tmp_path: Path, mutate, message: str) -> None:
    good = _write_idx(tmp_path / "good", np.zeros((3, 4, 4), dtype=np.uint8)).read_bytes()
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(mutate(good))
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_idx(bad)


def test_count_mismatch_and_missing_split(tmp_path: Path) -> None:
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((3,), dtype=np.uint8))
    with pytest.raises(DatasetError, match="count mismatch: 4 images .* 3 labels"):
        load_mnist(tmp_path, "train")
    with pytest.raises(DatasetError, match="no test split found"):
        load_mnist(tmp_path, "test")
    with pytest.raises(DatasetError, match="not a directory"):
        load_mnist(tmp_path / "nope", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist(tmp_path, "validation")


def test_corrupt_gzip_is_a_dataset_error(tmp_path: Path) -> None:
    src = DATA_DIR / "test-3k-labels-idx1-ubyte.gz"
    bad = tmp_path / "test-3k-labels-idx1-ubyte.gz"
    bad.write_bytes(src.read_bytes()[:100])
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(bad)
