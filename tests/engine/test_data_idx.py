"""engine.data's IDX files (idx:DIR, plain or gzipped) and the Fashion-MNIST loader built on them."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from engine.data import idx, load_data
from engine.errors import DataError
from tests.engine.data_helpers import idx_bytes, write_idx, write_idx_dir

# ---------------------------------------------------------------------------------------------
# IDX files


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", "<i4", ">f4", "<f8"])
def test_read_idx_round_trip(tmp_path: Path, dtype: str, gz: bool) -> None:
    values = np.arange(30).reshape(2, 3, 5) * 8 if dtype == "u1" else np.arange(30) - 7.0
    a = (values / 3.0 if "f" in dtype else values).reshape(2, 3, 5).astype(dtype)
    assert np.unique(a).size == 30  # the cast kept every value distinct
    path = write_idx(tmp_path / "a-idx3", a, gz=gz)
    out = idx.read_idx(path)
    assert out.shape == (2, 3, 5)
    assert out.dtype.isnative and out.dtype.kind == np.dtype(dtype).kind
    np.testing.assert_array_equal(out, a)


def test_idx_folder_loads_plain_and_gzipped(tmp_path: Path) -> None:
    arrays = write_idx_dir(tmp_path, gz=(True, False, False, True))
    ds = load_data(f"idx:{tmp_path}")
    np.testing.assert_array_equal(ds.x_train, arrays["train-images-idx3-ubyte"] / 255.0)
    np.testing.assert_array_equal(ds.x_test, arrays["t10k-images-idx3-ubyte"] / 255.0)
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.input_shape == (4, 3) and ds.x_train.dtype == np.float64
    assert ds.class_names == ("0", "1", "2")
    assert ds.source == f"idx:{tmp_path}"


def test_idx_folder_class_names_file_and_gzip_equals_plain(tmp_path: Path) -> None:
    write_idx_dir(tmp_path / "plain")
    write_idx_dir(tmp_path / "gz", gz=True)
    (tmp_path / "gz" / "class_names.txt").write_text("cat\n\ndog\nbird\n", encoding="utf-8")
    plain, zipped = load_data(f"idx:{tmp_path / 'plain'}"), load_data(f"idx:{tmp_path / 'gz'}")
    assert zipped.class_names == ("cat", "dog", "bird")
    np.testing.assert_array_equal(plain.x_train, zipped.x_train)


def _corrupt_cases() -> dict[str, tuple[bytes, str]]:
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    return {
        "empty": (b"", "too short"),
        "bad magic": (b"\x01\x00" + good[2:], "not an IDX file: magic number starts 0100"),
        "unknown dtype": (good[:2] + b"\x07" + good[3:], "unknown dtype code 0x07"),
        "no dims": (b"\x00\x00\x08\x00", "declares 0 dimensions"),
        "header cut": (good[:9], "truncated in its header: 3 dimensions need 16 bytes"),
        "data cut": (good[:-1], r"is truncated: shape \(2, 3, 4\) of uint8 needs 24 .* found 23"),
        "trailing": (good + b"\x00", "longer than its header says"),
        "gzip cut": (gzip.compress(good)[:-6], "corrupt or truncated gzip"),
        "gzip garbage": (b"\x1f\x8b" + b"\xff" * 40, "corrupt or truncated gzip"),
    }


@pytest.mark.parametrize("case", list(_corrupt_cases()))
def test_read_idx_corrupt(tmp_path: Path, case: str) -> None:
    data, message = _corrupt_cases()[case]
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError, match=message):
        idx.read_idx(path)


def test_idx_folder_corrupt_file_named(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte' is truncated"):
        load_data(f"idx:{tmp_path}")


def test_idx_folder_missing_file(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="has no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz"):
        load_data(f"idx:{tmp_path}")


def test_idx_folder_absent(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="IDX data folder .*nowhere' does not exist"):
        load_data(f"idx:{tmp_path / 'nowhere'}")


def test_idx_float_labels_refused(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", (np.arange(12) % 3).astype(">f4"))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte holds float32 values"):
        load_data(f"idx:{tmp_path}")


def test_idx_images_labels_length_mismatch(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="X_test has 6 rows but y_test has 5 labels"):
        load_data(f"idx:{tmp_path}")


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST

_FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def test_fashion_mnist_from_fake_package_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_idx_dir(tmp_path, gz=True, n_train=30, n_test=10, shape=(28, 28))
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", tmp_path)
    ds = load_data("fashion-mnist")
    assert ds.class_names == _FASHION_NAMES
    assert ds.source == "fashion-mnist"
    assert ds.x_train.shape == (30, 28, 28) and ds.x_test.shape == (10, 28, 28)
    np.testing.assert_array_equal(ds.x_train, arrays["train-images-idx3-ubyte"] / 255.0)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_fashion_mnist_missing_names_package_and_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = tmp_path / "no" / "fashion-mnist"
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", absent)
    with pytest.raises(DataError) as info:
        load_data("fashion-mnist")
    text = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in text
    assert str(absent) in text
    assert "train-images-idx3-ubyte[.gz]" in text and "idx:DIR" in text


@pytest.mark.skipif(
    not (idx.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
    and not (idx.FASHION_MNIST_DIR / "train-images-idx3-ubyte").is_file(),
    reason="Debian's dataset-fashion-mnist package is not installed",
)
def test_fashion_mnist_real_package() -> None:
    ds = load_data("fashion-mnist")
    assert (ds.n_train, ds.n_test, ds.input_shape) == (60_000, 10_000, (28, 28))
    assert ds.class_names == _FASHION_NAMES
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    sub = load_data("fashion-mnist", seed=3, train_size=2000, test_size=500)
    assert np.bincount(sub.y_train).tolist() == [200] * 10
    np.testing.assert_array_equal(sub.x_train, ds.x_train[sub.train_index])
