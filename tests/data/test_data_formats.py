"""CIFAR-10, STL-10 and image-folder loaders on tiny files written here in the real on-disk formats."""

from __future__ import annotations

import codecs
import io
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from selective_amnesia.data import DATASETS, load_cifar10, load_dataset, load_image_folder, load_stl10
from selective_amnesia.data.cifar import CIFAR10_CLASSES
from selective_amnesia.data.mnist import _NumpyOnlyUnpickler
from selective_amnesia.data.stl import STL10_CLASSES
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.safe_pickle import (
    NUMPY_ARRAY_GLOBALS,
    PY3_PROTOCOL2_BYTES_GLOBALS,
    SafeUnpickler,
    UnsafePickleError,
    safe_load,
)

# ---------------------------------------------------------------- safe_pickle


_PurePythonPickler: Any = vars(pickle)["_Pickler"]  # the pure-Python pickler, whose dispatch we can extend


class _Py2StylePickler(_PurePythonPickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING opcodes, no globals), like cPickle did for CIFAR."""

    dispatch = dict(_PurePythonPickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _py2_dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    # numpy 1 and Python 2 name the reconstructor numpy.core.multiarray
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


class _Calls:
    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def test_default_allows_numpy_arrays_under_every_protocol() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        payload = pickle.dumps(arr, protocol=protocol)
        if protocol == 2:  # Python 3 writes the raw bytes through _codecs.encode: not allowed by default
            with pytest.raises(UnsafePickleError, match="_codecs.encode"):
                safe_load(io.BytesIO(payload))
            out = safe_load(io.BytesIO(payload), NUMPY_ARRAY_GLOBALS | PY3_PROTOCOL2_BYTES_GLOBALS)
        else:
            out = safe_load(io.BytesIO(payload))
        np.testing.assert_array_equal(out, arr)
    # the name the MNIST tests use still works
    np.testing.assert_array_equal(_NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arr))).load(), arr)


def test_py2_pickle_of_an_array_needs_only_numpy_globals() -> None:
    arr = (np.arange(300) % 256).astype(np.uint8)  # > 255 bytes: BINSTRING, not SHORT_BINSTRING
    np.testing.assert_array_equal(safe_load(io.BytesIO(_py2_dumps(arr))), arr)


def test_refuses_code_and_unsafe_uses_of_allowed_globals(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    everything = NUMPY_ARRAY_GLOBALS | PY3_PROTOCOL2_BYTES_GLOBALS
    for evil in (_Calls(open, str(marker), "w"), _Calls(eval, f"open({str(marker)!r}, 'w')")):
        with pytest.raises(UnsafePickleError, match="refusing to load global (io|builtins)"):
            safe_load(io.BytesIO(pickle.dumps(evil)), everything)
    with pytest.raises(UnsafePickleError, match="latin1"):
        safe_load(io.BytesIO(pickle.dumps(_Calls(codecs.encode, "text", "rot13"))), everything)
    with pytest.raises(UnsafePickleError, match="bytes"):
        safe_load(io.BytesIO(pickle.dumps(_Calls(bytes, 10**6))), everything)
    assert not marker.exists()
    with pytest.raises(ValueError, match="no safe resolver"):
        SafeUnpickler(io.BytesIO(b""), allowed={("os", "system")})


# ---------------------------------------------------------------- CIFAR-10


def _cifar_batch(n: int, seed: int, label_offset: int = 0) -> dict[bytes, Any]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": [(label_offset + i) % 10 for i in range(n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        # a trailing b"" makes Python 3 write the __builtin__.bytes global at protocol 2
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)] + [b""],
    }


def _write_cifar(root: Path, protocol: int = 2) -> dict[str, dict[bytes, Any]]:
    batches_dir = root / "cifar-10-batches-py"
    batches_dir.mkdir(parents=True)
    batches = {f"data_batch_{i}": _cifar_batch(2, i, label_offset=i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(3, 99)
    for name, batch in batches.items():
        with (batches_dir / name).open("wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reads_python_batches(tmp_path: Path, protocol: int) -> None:
    batches = _write_cifar(tmp_path, protocol)
    test = load_cifar10(tmp_path, "test")
    assert test.images.shape == (3, 3, 32, 32) and test.images.dtype.is_floating_point is False
    assert str(test.images.dtype) == "torch.uint8" and str(test.labels.dtype) == "torch.int64"
    data = batches["test_batch"][b"data"]
    # each row is the R, G, B planes, each 32x32 row-major
    assert int(test.images[1, 0, 0, 1]) == data[1, 1]
    assert int(test.images[1, 1, 2, 3]) == data[1, 1024 + 2 * 32 + 3]
    assert int(test.images[2, 2, 31, 31]) == data[2, 3071]
    assert test.labels.tolist() == batches["test_batch"][b"labels"]

    train = load_cifar10(tmp_path / "cifar-10-batches-py", "train")  # root may be the batches dir itself
    assert train.images.shape == (10, 3, 32, 32)
    expected = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    np.testing.assert_array_equal(train.images.reshape(10, -1).numpy(), expected)
    assert train.labels.tolist() == [(i + j) % 10 for i in range(1, 6) for j in range(2)]
    assert len(CIFAR10_CLASSES) == 10 and CIFAR10_CLASSES[0] == "airplane"


def test_cifar10_reads_python2_style_batches_with_str_keys(tmp_path: Path) -> None:
    # the original files come from Python 2: str keys/filenames, array bytes as str, no _codecs global
    batch = _cifar_batch(4, 7)
    payload = _py2_dumps(batch)
    assert b"_codecs" not in payload and b"cnumpy.core.multiarray\n_reconstruct" in payload
    (tmp_path / "test_batch").write_bytes(payload)
    ds = load_dataset("cifar10", "test", root=str(tmp_path))
    np.testing.assert_array_equal(ds.images.reshape(4, -1).numpy(), batch[b"data"])
    assert ds.labels.tolist() == batch[b"labels"]


def test_cifar10_missing_files_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(AmnesiaError, match=r"CIFAR-10 not found in .*data_batch_1\.\.5 and test_batch"):
        load_cifar10(tmp_path, "train")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(AmnesiaError, match="tar xzf cifar-10-python.tar.gz"):
        load_cifar10(tmp_path, "test")
    with pytest.raises(AmnesiaError, match="no such directory"):
        load_cifar10(tmp_path / "nope", "test")
    batches_dir = tmp_path / "cifar-10-batches-py"
    batches_dir.mkdir()
    (batches_dir / "test_batch").write_bytes(pickle.dumps(_cifar_batch(1, 0), protocol=2))
    assert len(load_cifar10(tmp_path, "test")) == 1
    with pytest.raises(AmnesiaError, match="missing data_batch_1, data_batch_2, .*data_batch_5"):
        load_cifar10(tmp_path, "train")
    with pytest.raises(AmnesiaError, match="set data.root"):
        load_dataset("cifar10", "test")
    with pytest.raises(AmnesiaError, match="unknown split"):
        load_cifar10(tmp_path, "val")


def test_malicious_cifar_batch_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    batch = _cifar_batch(1, 0)
    batch[b"filenames"] = _Calls(open, str(marker), "w")  # hidden inside an otherwise valid batch
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(AmnesiaError, match=r"refused .*refusing to load global io\.open.*tampered"):
        load_cifar10(tmp_path, "test")
    assert not marker.exists()


def test_damaged_cifar_batches_are_clear_errors(tmp_path: Path) -> None:
    good = pickle.dumps(_cifar_batch(2, 0), protocol=2)
    cases = {
        good[: len(good) // 2]: "not a readable CIFAR-10 batch",
        pickle.dumps([1, 2, 3], protocol=2): "holds a list",
        pickle.dumps({b"fine_labels": [0], b"data": np.zeros((1, 3072), np.uint8)}): "CIFAR-100",
        pickle.dumps({b"labels": [0], b"data": np.zeros((1, 3072), np.float32)}): "uint8 array",
        pickle.dumps({b"labels": [0, 1], b"data": np.zeros((1, 3072), np.uint8)}): "1 images",
        pickle.dumps({b"labels": [10], b"data": np.zeros((1, 3072), np.uint8)}): "0..9",
        pickle.dumps({b"labels": [0.5], b"data": np.zeros((1, 3072), np.uint8)}): "not a list of integers",
    }
    for payload, message in cases.items():
        (tmp_path / "test_batch").write_bytes(payload)
        with pytest.raises(AmnesiaError, match=message):
            load_cifar10(tmp_path, "test")


# ---------------------------------------------------------------- STL-10


def _stl_bytes(images_chw: np.ndarray) -> bytes:
    """The STL-10 layout: per image 3 planes, each plane column-major."""
    return np.ascontiguousarray(images_chw.transpose(0, 1, 3, 2)).tobytes()


def _write_stl(directory: Path, split: str, images_chw: np.ndarray, labels_1_to_10: list[int]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{split}_X.bin").write_bytes(_stl_bytes(images_chw))
    (directory / f"{split}_y.bin").write_bytes(bytes(labels_1_to_10))


def test_stl10_column_major_planes_are_transposed(tmp_path: Path) -> None:
    # written byte by byte, independent of the loader's reshape: plane c, column col, row row
    raw = bytearray(2 * 3 * 96 * 96)
    plane = 96 * 96
    raw[0 * plane + 1 * 96 + 0] = 200  # image 0, red, row 0, col 1
    raw[0 * plane + 0 * 96 + 1] = 100  # image 0, red, row 1, col 0
    raw[2 * plane + 95 * 96 + 3] = 50  # image 0, blue, row 3, col 95
    raw[3 * plane + 1 * plane + 10 * 96 + 20] = 7  # image 1, green, row 20, col 10
    directory = tmp_path / "stl10_binary"
    directory.mkdir()
    (directory / "test_X.bin").write_bytes(bytes(raw))
    (directory / "test_y.bin").write_bytes(bytes([1, 10]))
    ds = load_stl10(tmp_path, "test")
    assert ds.images.shape == (2, 3, 96, 96) and str(ds.images.dtype) == "torch.uint8"
    assert int(ds.images[0, 0, 0, 1]) == 200 and int(ds.images[0, 0, 1, 0]) == 100
    assert int(ds.images[0, 2, 3, 95]) == 50 and int(ds.images[1, 1, 20, 10]) == 7
    assert int(ds.images.sum()) == 200 + 100 + 50 + 7
    assert ds.labels.tolist() == [0, 9] and str(ds.labels.dtype) == "torch.int64"
    assert STL10_CLASSES[ds.labels[1]] == "truck" and len(STL10_CLASSES) == 10


def test_stl10_round_trip_and_root_is_the_binary_dir(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)
    _write_stl(tmp_path / "stl10_binary", "train", images, [3, 1, 7])
    ds = load_dataset("stl10", "train", root=str(tmp_path / "stl10_binary"))
    np.testing.assert_array_equal(ds.images.numpy(), images)
    assert ds.labels.tolist() == [2, 0, 6]


def test_stl10_missing_and_truncated_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(AmnesiaError, match=r"STL-10 not found in .*stl10_binary/train_X\.bin"):
        load_stl10(tmp_path, "train")
    with pytest.raises(AmnesiaError, match="set data.root"):
        load_dataset("stl10", "train", root=None)
    directory = tmp_path / "stl10_binary"
    images = np.zeros((2, 3, 96, 96), dtype=np.uint8)
    _write_stl(directory, "train", images, [1, 2])
    with pytest.raises(AmnesiaError, match="missing test_X.bin, test_y.bin"):
        load_stl10(tmp_path, "test")
    (directory / "train_X.bin").write_bytes(_stl_bytes(images)[:-1000])
    with pytest.raises(AmnesiaError, match="truncated"):
        load_stl10(tmp_path, "train")
    (directory / "train_X.bin").write_bytes(_stl_bytes(images[:1]))
    with pytest.raises(AmnesiaError, match="1 images, train_y.bin has 2 labels"):
        load_stl10(tmp_path, "train")
    (directory / "train_y.bin").write_bytes(bytes([0]))
    with pytest.raises(AmnesiaError, match="labels must be 1..10"):
        load_stl10(tmp_path, "train")


def test_dataset_names() -> None:
    assert DATASETS == ("mnist", "fashion-mnist", "cifar10", "stl10")
    with pytest.raises(AmnesiaError, match="did you mean 'cifar10'"):
        load_dataset("CIFAR-10", "train")
    with pytest.raises(AmnesiaError, match="unknown split"):
        load_dataset("stl10", "unlabeled", root="/nonexistent")


# ---------------------------------------------------------------- image folder


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_with_class_subdirectories(tmp_path: Path) -> None:
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    gray = np.full((8, 8), 77, np.uint8)
    _save(tmp_path / "10" / "a.png", red)
    _save(tmp_path / "2" / "b.png", gray)
    _save(tmp_path / "2" / "a.jpg", red)
    (tmp_path / "2" / "notes.txt").write_text("ignored")
    (tmp_path / ".cache").mkdir()  # hidden entries are skipped
    ds = load_image_folder(tmp_path, image_size=None, channels=3)
    assert ds.images.shape == (3, 3, 8, 8) and str(ds.images.dtype) == "torch.uint8"
    assert ds.labels.tolist() == [2, 2, 10]  # numeric label order, then file name
    assert int(ds.images[0, 0].float().mean()) > 240  # a.jpg is red (JPEG is lossy)
    assert ds.images[1].unique().tolist() == [77]  # grayscale PNG expanded to RGB
    assert ds.images[2, 0].unique().tolist() == [255] and ds.images[2, 1:].unique().tolist() == [0]

    gray_ds = load_image_folder(tmp_path, image_size=None, channels=1)
    assert gray_ds.images.shape == (3, 1, 8, 8) and gray_ds.images[1].unique().tolist() == [77]


def test_flat_folder_resize_and_size_mismatch(tmp_path: Path) -> None:
    _save(tmp_path / "wide.png", np.full((10, 20, 3), 120, np.uint8))
    _save(tmp_path / "small.png", np.full((4, 4, 3), 30, np.uint8))
    with pytest.raises(AmnesiaError, match="images differ in size.*set image_size"):
        load_image_folder(tmp_path, image_size=None, channels=3)
    ds = load_image_folder(tmp_path, image_size=6, channels=3)
    assert ds.images.shape == (2, 3, 6, 6) and ds.labels.tolist() == [-1, -1]
    assert ds.images[0].unique().tolist() == [30] and ds.images[1].unique().tolist() == [120]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(AmnesiaError, match="does not exist"):
        load_image_folder(tmp_path / "missing", image_size=None, channels=3)
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(AmnesiaError, match="is empty"):
        load_image_folder(tmp_path, image_size=None, channels=3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(AmnesiaError, match="cannot read image .*broken.png"):
        load_image_folder(tmp_path, image_size=None, channels=3)
    with pytest.raises(AmnesiaError, match="channels must be 1"):
        load_image_folder(tmp_path, image_size=None, channels=4)
    with pytest.raises(AmnesiaError, match="image_size must be a positive"):
        load_image_folder(tmp_path, image_size=0, channels=3)
    (tmp_path / "broken.png").unlink()
    _save(tmp_path / "cats" / "x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(AmnesiaError, match="named by integer class label.*'cats'"):
        load_image_folder(tmp_path, image_size=None, channels=1)
    (tmp_path / "cats").rename(tmp_path / "3")
    _save(tmp_path / "stray.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(AmnesiaError, match="mixes images"):
        load_image_folder(tmp_path, image_size=None, channels=1)
