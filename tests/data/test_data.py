import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from selective_amnesia.data import load_dataset
from selective_amnesia.data.mnist import _NumpyOnlyUnpickler, read_idx
from selective_amnesia.errors import AmnesiaError


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def test_idx_directory_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    lbls = rng.integers(0, 10, (7,), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", lbls)
    ds = load_dataset("mnist", "test", root=str(tmp_path))
    assert ds.images.shape == (7, 1, 28, 28)
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), imgs)
    np.testing.assert_array_equal(ds.labels.numpy(), lbls)


def test_truncated_idx_is_an_error() -> None:
    raw = bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02"
    with pytest.raises(AmnesiaError, match="truncated"):
        read_idx(raw)
    with pytest.raises(AmnesiaError, match="magic"):
        read_idx(b"\x01\x02\x03\x04")


def test_missing_idx_files_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(AmnesiaError, match="data.root"):
        load_dataset("mnist", "train", root=str(tmp_path))
    with pytest.raises(AmnesiaError, match="unknown dataset"):
        load_dataset("cifar", "train")


def test_data_unpickler_refuses_code() -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    payload = pickle.dumps(Evil())
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    ok = pickle.dumps(np.arange(5, dtype=np.float32))
    np.testing.assert_array_equal(_NumpyOnlyUnpickler(io.BytesIO(ok)).load(), np.arange(5))


def test_packaged_mnist_loads_exact_bytes() -> None:
    test = load_dataset("mnist", "test")
    assert test.images.shape == (10000, 1, 28, 28) and int(test.images.max()) == 255
    assert sorted(test.labels.unique().tolist()) == list(range(10))
