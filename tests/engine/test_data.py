"""Tests for engine.data: the loaders, IDX files, subsets, validation messages, the fingerprint."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import Dataset, fingerprint, idx, load_data, validate
from engine.data.subset import stratified_indices
from engine.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# helpers


def _arrays(
    *, n_train: int = 6, n_test: int = 4, shape: tuple[int, ...] = (3,), seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "X_train": rng.normal(size=(n_train, *shape)),
        "y_train": np.arange(n_train) % 3,
        "X_test": rng.normal(size=(n_test, *shape)),
        "y_test": np.arange(n_test) % 3,
    }


def _save_npz(tmp_path: Path, name: str = "data.npz", **arrays: object) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return str(path)


def _dataset(**overrides: object) -> Dataset:
    a = _arrays()
    fields: dict[str, object] = {
        "x_train": a["X_train"],
        "y_train": a["y_train"],
        "x_test": a["X_test"],
        "y_test": a["y_test"],
        "class_names": ("a", "b", "c"),
        "source": "memory",
    }
    fields.update(overrides)
    return Dataset(**fields)  # type: ignore[arg-type]


def _write_png(path: Path, pixels: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_data("digits", seed=0)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_and_split(digits: Dataset) -> None:
    assert digits.x_train.shape == (1297, 8, 8)
    assert digits.x_test.shape == (500, 8, 8)
    assert digits.y_train.shape == (1297,) and digits.y_test.shape == (500,)
    assert digits.x_train.dtype == np.float64 and digits.y_train.dtype == np.int64
    assert digits.input_shape == (8, 8)
    assert (digits.n_train, digits.n_test, digits.n_classes) == (1297, 500, 10)
    assert digits.class_names == tuple(str(k) for k in range(10))
    assert digits.source == "digits"


def test_digits_split_follows_seeded_permutation(digits: Dataset) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    perm = np.random.default_rng(0).permutation(1797)
    test_idx, train_idx = np.sort(perm[:500]), np.sort(perm[500:])
    np.testing.assert_array_equal(digits.x_test, raw.images[test_idx] / 16.0)
    np.testing.assert_array_equal(digits.y_train, raw.target[train_idx])


def test_digits_values_in_unit_interval(digits: Dataset) -> None:
    for x in (digits.x_train, digits.x_test):
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert digits.x_train.max() == 1.0


def test_digits_same_seed_same_split_other_seed_other_split(digits: Dataset) -> None:
    again = load_data("digits", seed=0)
    other = load_data("digits", seed=1)
    np.testing.assert_array_equal(again.x_train, digits.x_train)
    np.testing.assert_array_equal(again.y_test, digits.y_test)
    assert fingerprint(again) == fingerprint(digits)
    assert fingerprint(other) != fingerprint(digits)
    assert not np.array_equal(other.x_test, digits.x_test)


def test_arrays_read_only_and_contiguous(digits: Dataset) -> None:
    for a in (digits.x_train, digits.y_train, digits.x_test, digits.y_test):
        assert not a.flags.writeable and a.flags.c_contiguous
    with pytest.raises(ValueError):
        digits.x_train[0, 0, 0] = 5.0


def test_validate_copies_and_does_not_freeze_caller_arrays() -> None:
    x = np.random.default_rng(0).normal(size=(6, 3))
    ds = validate(_dataset(x_train=x))
    assert x.flags.writeable
    x[0, 0] = 123.0
    assert ds.x_train[0, 0] != 123.0
    again = validate(ds)
    assert again.x_train is ds.x_train


# ---------------------------------------------------------------------------------------------
# npz


def test_npz_float_kept_bitwise(tmp_path: Path) -> None:
    a = _arrays()
    a["X_train"][0, 0] = 1e-300  # would not survive any rescaling
    a["X_test"][1, 2] = -7.123456789012345
    ds = load_data(_save_npz(tmp_path, **a))
    assert ds.x_train.tobytes() == a["X_train"].tobytes()
    assert ds.x_test.tobytes() == a["X_test"].tobytes()
    np.testing.assert_array_equal(ds.y_train, a["y_train"])
    assert ds.class_names == ("0", "1", "2")


def test_npz_float32_cast_exactly(tmp_path: Path) -> None:
    a = _arrays()
    a["X_train"] = a["X_train"].astype(np.float32)
    ds = load_data(_save_npz(tmp_path, **a))
    assert ds.x_train.dtype == np.float64
    np.testing.assert_array_equal(ds.x_train, a["X_train"].astype(np.float64))


def test_npz_uint8_divided_by_255(tmp_path: Path) -> None:
    a = _arrays(shape=(2, 2))
    rng = np.random.default_rng(1)
    a["X_train"] = rng.integers(0, 256, size=(6, 2, 2), dtype=np.uint8)
    a["X_test"] = rng.integers(0, 256, size=(4, 2, 2), dtype=np.uint8)
    a["X_test"][0, 0, 0] = 255
    ds = load_data(_save_npz(tmp_path, **a))
    np.testing.assert_array_equal(ds.x_train, a["X_train"] / 255.0)
    assert ds.x_test[0, 0, 0] == 1.0


@pytest.mark.parametrize("shape", [(5,), (4, 3), (4, 3, 1), (4, 3, 3), (2, 2, 4)])
def test_npz_input_shapes(tmp_path: Path, shape: tuple[int, ...]) -> None:
    ds = load_data(_save_npz(tmp_path, **_arrays(shape=shape)))
    assert ds.input_shape == shape
    assert ds.x_train.shape == (6, *shape) and ds.x_test.shape == (4, *shape)


def test_npz_class_names_kept(tmp_path: Path) -> None:
    names = np.array(["cat", "dog", "bird", "fish"])
    ds = load_data(_save_npz(tmp_path, class_names=names, **_arrays()))
    assert ds.class_names == ("cat", "dog", "bird", "fish")
    assert all(type(n) is str for n in ds.class_names)
    assert ds.n_classes == 4


def test_npz_float_labels_integral_accepted(tmp_path: Path) -> None:
    a = _arrays()
    a["y_train"] = a["y_train"].astype(np.float32)
    ds = load_data(_save_npz(tmp_path, **a))
    assert ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.y_train, np.arange(6) % 3)


def test_npz_source_is_path_as_given(tmp_path: Path) -> None:
    path = _save_npz(tmp_path, **_arrays())
    assert load_data(path).source == path


# ---------------------------------------------------------------------------------------------
# image folder


def test_image_folder_grayscale_round_trip(tmp_path: Path) -> None:
    values = {"a": 0, "b": 51, "c": 102, "d": 255, "e": 153}
    px = {name: np.full((3, 2), v, dtype=np.uint8) for name, v in values.items()}
    _write_png(tmp_path / "train" / "zebra" / "b.png", px["b"], "L")
    _write_png(tmp_path / "train" / "zebra" / "a.PNG", px["a"], "L")
    _write_png(tmp_path / "train" / "ant" / "z.png", px["c"], "L")
    _write_png(tmp_path / "test" / "zebra" / "x.png", px["d"], "L")
    _write_png(tmp_path / "test" / "ant" / "y.png", px["e"], "L")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored")
    ds = load_data(str(tmp_path))
    assert ds.class_names == ("ant", "zebra")
    assert ds.x_train.shape == (3, 3, 2) and ds.x_test.shape == (2, 3, 2)
    # sorted by relative path: ant/z.png, zebra/a.PNG, zebra/b.png
    np.testing.assert_array_equal(ds.y_train, [0, 1, 1])
    np.testing.assert_array_equal(ds.x_train[:, 0, 0], np.array([102, 0, 51]) / 255.0)
    np.testing.assert_array_equal(ds.y_test, [0, 1])
    np.testing.assert_array_equal(ds.x_test[:, 1, 1], np.array([153, 255]) / 255.0)
    assert ds.source == str(tmp_path)


def test_image_folder_mixed_becomes_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    gray = np.full((2, 2), 200, dtype=np.uint8)
    _write_png(tmp_path / "train" / "0" / "a.png", rgb, "RGB")
    _write_png(tmp_path / "train" / "1" / "b.png", gray, "L")
    _write_png(tmp_path / "test" / "1" / "c.png", gray, "L")
    ds = load_data(str(tmp_path) + "/")
    assert ds.input_shape == (2, 2, 3)
    np.testing.assert_array_equal(ds.x_train[0, 0, 0], np.array([10, 20, 30]) / 255.0)
    np.testing.assert_array_equal(ds.x_train[1], np.full((2, 2, 3), 200 / 255.0))
    np.testing.assert_array_equal(ds.y_train, [0, 1])
    np.testing.assert_array_equal(ds.y_test, [1])


def test_image_folder_jpeg_rgb(tmp_path: Path) -> None:
    img = np.full((4, 4, 3), 128, dtype=np.uint8)
    for split, cls in [("train", "a"), ("train", "b"), ("test", "a")]:
        path = tmp_path / split / cls / "img.JPG"
        path.parent.mkdir(parents=True)
        Image.fromarray(img, mode="RGB").save(path, format="JPEG")
    ds = load_data(str(tmp_path))
    assert ds.x_train.shape == (2, 4, 4, 3)
    assert np.abs(ds.x_train - 128 / 255.0).max() < 0.02


# ---------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_stable_across_processes(digits: Dataset) -> None:
    code = "from engine.data import load_data, fingerprint; print(fingerprint(load_data('digits')))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == fingerprint(digits)
    assert len(fingerprint(digits)) == 64


def test_fingerprint_sensitive_to_one_pixel_label_and_name() -> None:
    base = validate(_dataset())
    x = base.x_train.copy()
    x[2, 1] = np.nextafter(x[2, 1], np.inf)
    y = base.y_test.copy()
    y[0] = (y[0] + 1) % 3
    digests = {
        fingerprint(base),
        fingerprint(validate(_dataset(x_train=x))),
        fingerprint(validate(_dataset(y_test=y))),
        fingerprint(validate(_dataset(class_names=("a", "b", "C")))),
    }
    assert len(digests) == 4
    assert fingerprint(validate(_dataset(source="elsewhere"))) == fingerprint(base)


def test_fingerprint_of_whole_data_unchanged_by_subset_support(digits: Dataset) -> None:
    # Runs built before subsets existed stored this digest; a whole data set must keep it.
    assert fingerprint(digits) == (
        "cd7c8443859f29dfb7d3fd3184d0cdf94d31756bae711e4b14ebd911fd4c2e27"
    )


# ---------------------------------------------------------------------------------------------
# bad input: one test each


def test_unknown_spec() -> None:
    with pytest.raises(DataError, match="cannot load data 'mnist'.*expected 'digits'"):
        load_data("mnist")


def test_missing_npz_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such .npz file"):
        load_data(str(tmp_path / "absent.npz"))


def test_corrupt_npz(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="cannot read .* as a .npz archive"):
        load_data(str(path))


def test_bad_seed() -> None:
    with pytest.raises(DataError, match="seed must be a non-negative integer"):
        load_data("digits", seed=-1)


def test_npz_missing_arrays(tmp_path: Path) -> None:
    a = _arrays()
    del a["X_test"], a["y_test"]
    msg = r"missing arrays: X_test, y_test \(found: X_train, y_train"
    with pytest.raises(DataError, match=msg):
        load_data(_save_npz(tmp_path, **a))


def test_validate_missing_arrays() -> None:
    with pytest.raises(DataError, match=r"missing arrays: y_test \(found: X_train"):
        validate(_dataset(y_test=None))


def test_npz_pickled_object_array(tmp_path: Path) -> None:
    a = _arrays()
    a["y_train"] = np.array([0, 1, "2", None, 1, 0], dtype=object)
    path = tmp_path / "obj.npz"
    np.savez(path, allow_pickle=True, **a)
    with pytest.raises(DataError, match="array 'y_train' .* cannot be loaded without pickle"):
        load_data(str(path))


def test_npz_integer_x_refused(tmp_path: Path) -> None:
    a = _arrays()
    a["X_train"] = np.ones((6, 3), dtype=np.int32)
    with pytest.raises(DataError, match="X_train has dtype int32; expected a float array or uint8"):
        load_data(_save_npz(tmp_path, **a))


@pytest.mark.parametrize("shape", [(6,), (6, 2, 2, 2, 2)])
def test_x_wrong_ndim(tmp_path: Path, shape: tuple[int, ...]) -> None:
    a = _arrays()
    a["X_train"] = np.zeros(shape)
    with pytest.raises(DataError, match="X_train must have 2, 3 or 4 dimensions"):
        load_data(_save_npz(tmp_path, **a))


def test_x_too_many_channels(tmp_path: Path) -> None:
    a = _arrays(shape=(2, 2, 5))
    with pytest.raises(DataError, match="X_train has 5 channels"):
        load_data(_save_npz(tmp_path, **a))


def test_x_y_length_mismatch(tmp_path: Path) -> None:
    a = _arrays()
    a["y_test"] = a["y_test"][:3]
    with pytest.raises(DataError, match="X_test has 4 rows but y_test has 3 labels"):
        load_data(_save_npz(tmp_path, **a))


def test_feature_shapes_differ(tmp_path: Path) -> None:
    a = _arrays()
    a["X_test"] = np.zeros((4, 5))
    with pytest.raises(DataError, match=r"train and test feature shapes differ.*\(3,\).*\(5,\)"):
        load_data(_save_npz(tmp_path, **a))


def test_y_not_1d(tmp_path: Path) -> None:
    a = _arrays()
    a["y_train"] = a["y_train"].reshape(6, 1)
    with pytest.raises(DataError, match=r"y_train must be 1-D.*got shape \(6, 1\)"):
        load_data(_save_npz(tmp_path, **a))


def test_label_negative(tmp_path: Path) -> None:
    a = _arrays()
    a["y_test"][2] = -1
    with pytest.raises(DataError, match=r"y_test \(test split\) has label -1 outside 0\.\.2"):
        load_data(_save_npz(tmp_path, **a))


def test_label_not_integer(tmp_path: Path) -> None:
    a = _arrays()
    a["y_train"] = a["y_train"].astype(np.float64)
    a["y_train"][1] = 1.5
    with pytest.raises(DataError, match="y_train has non-integer label 1.5"):
        load_data(_save_npz(tmp_path, **a))


def test_class_names_too_short(tmp_path: Path) -> None:
    a = _arrays()
    msg = r"label 2 outside 0\.\.1: class_names has 2 names, need at least 3"
    with pytest.raises(DataError, match=msg):
        load_data(_save_npz(tmp_path, class_names=np.array(["a", "b"]), **a))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_x(tmp_path: Path, bad: float) -> None:
    a = _arrays()
    a["X_test"][0, 0] = bad
    a["X_test"][3, 2] = bad
    with pytest.raises(DataError, match=r"X_test \(test split\) has 2 NaN or inf values"):
        load_data(_save_npz(tmp_path, **a))


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_split(tmp_path: Path, split: str) -> None:
    a = _arrays()
    a[f"X_{split}"] = a[f"X_{split}"][:0]
    a[f"y_{split}"] = a[f"y_{split}"][:0]
    with pytest.raises(DataError, match=f"{split} split is empty"):
        load_data(_save_npz(tmp_path, **a))


def test_single_class_in_train(tmp_path: Path) -> None:
    a = _arrays()
    a["y_train"][:] = 1
    with pytest.raises(DataError, match="train split has only 1 class present"):
        load_data(_save_npz(tmp_path, **a))


def test_duplicate_class_names() -> None:
    with pytest.raises(DataError, match="duplicate name 'a'"):
        validate(_dataset(class_names=("a", "b", "a")))


def test_image_folder_missing_test_subfolder(tmp_path: Path) -> None:
    _write_png(tmp_path / "train" / "a" / "x.png", np.zeros((2, 2), np.uint8), "L")
    with pytest.raises(DataError, match="has no test/ subfolder"):
        load_data(str(tmp_path))


def test_image_folder_test_class_not_in_train(tmp_path: Path) -> None:
    px = np.zeros((2, 2), np.uint8)
    for rel in ["train/a/1.png", "train/b/1.png", "test/a/1.png", "test/c/1.png"]:
        _write_png(tmp_path / rel, px, "L")
    with pytest.raises(DataError, match="test class 'c' .* has no folder in train/"):
        load_data(str(tmp_path))


def test_image_folder_size_mismatch(tmp_path: Path) -> None:
    _write_png(tmp_path / "train" / "a" / "1.png", np.zeros((2, 2), np.uint8), "L")
    _write_png(tmp_path / "train" / "b" / "1.png", np.zeros((2, 2), np.uint8), "L")
    _write_png(tmp_path / "test" / "b" / "2.png", np.zeros((3, 2), np.uint8), "L")
    with pytest.raises(DataError, match=r"image '.*test/b/2\.png' is 2x3 \(WxH\) but .* is 2x2"):
        load_data(str(tmp_path))


def test_image_folder_corrupt_image(tmp_path: Path) -> None:
    _write_png(tmp_path / "train" / "a" / "1.png", np.zeros((2, 2), np.uint8), "L")
    _write_png(tmp_path / "train" / "b" / "1.png", np.zeros((2, 2), np.uint8), "L")
    (tmp_path / "test" / "a").mkdir(parents=True)
    (tmp_path / "test" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"cannot read image '.*broken\.png'"):
        load_data(str(tmp_path))


def test_image_folder_no_images(tmp_path: Path) -> None:
    _write_png(tmp_path / "train" / "a" / "1.png", np.zeros((2, 2), np.uint8), "L")
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="test split is empty: no .png/.jpg/.jpeg files"):
        load_data(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# IDX files

_IDX_CODES = {"u1": 0x08, "i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def _idx_bytes(a: np.ndarray, *, code: int | None = None) -> bytes:
    """An IDX file's bytes, written by hand: 00 00 code ndim, big-endian u32 sizes, data."""
    big = a.astype(a.dtype.newbyteorder(">")) if a.dtype.itemsize > 1 else a
    code = _IDX_CODES[big.dtype.str.lstrip("|")] if code is None else code
    header = bytes([0, 0, code, a.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    return header + big.tobytes()


def _write_idx(path: Path, a: np.ndarray, *, gz: bool = False) -> Path:
    data = _idx_bytes(a)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _idx_arrays(
    *, n_train: int = 12, n_test: int = 6, shape: tuple[int, ...] = (4, 3), seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 3).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 3).astype(np.uint8),
    }


def _write_idx_dir(folder: Path, *, gz: bool | tuple[bool, ...] = False,
                   **kw: object) -> dict[str, np.ndarray]:
    arrays = _idx_arrays(**kw)  # type: ignore[arg-type]
    flags = gz if isinstance(gz, tuple) else (gz,) * 4
    for (stem, a), flag in zip(arrays.items(), flags, strict=True):
        _write_idx(folder / stem, a, gz=flag)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", "<i4", ">f4", "<f8"])
def test_read_idx_round_trip(tmp_path: Path, dtype: str, gz: bool) -> None:
    values = np.arange(30).reshape(2, 3, 5) * 8 if dtype == "u1" else np.arange(30) - 7.0
    a = (values / 3.0 if "f" in dtype else values).reshape(2, 3, 5).astype(dtype)
    assert np.unique(a).size == 30  # the cast kept every value distinct
    path = _write_idx(tmp_path / "a-idx3", a, gz=gz)
    out = idx.read_idx(path)
    assert out.shape == (2, 3, 5)
    assert out.dtype.isnative and out.dtype.kind == np.dtype(dtype).kind
    np.testing.assert_array_equal(out, a)


def test_idx_folder_loads_plain_and_gzipped(tmp_path: Path) -> None:
    arrays = _write_idx_dir(tmp_path, gz=(True, False, False, True))
    ds = load_data(f"idx:{tmp_path}")
    np.testing.assert_array_equal(ds.x_train, arrays["train-images-idx3-ubyte"] / 255.0)
    np.testing.assert_array_equal(ds.x_test, arrays["t10k-images-idx3-ubyte"] / 255.0)
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.input_shape == (4, 3) and ds.x_train.dtype == np.float64
    assert ds.class_names == ("0", "1", "2")
    assert ds.source == f"idx:{tmp_path}"


def test_idx_folder_class_names_file_and_gzip_equals_plain(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path / "plain")
    _write_idx_dir(tmp_path / "gz", gz=True)
    (tmp_path / "gz" / "class_names.txt").write_text("cat\n\ndog\nbird\n", encoding="utf-8")
    plain, zipped = load_data(f"idx:{tmp_path / 'plain'}"), load_data(f"idx:{tmp_path / 'gz'}")
    assert zipped.class_names == ("cat", "dog", "bird")
    np.testing.assert_array_equal(plain.x_train, zipped.x_train)


def _corrupt_cases() -> dict[str, tuple[bytes, str]]:
    good = _idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
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
    _write_idx_dir(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte' is truncated"):
        load_data(f"idx:{tmp_path}")


def test_idx_folder_missing_file(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="has no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz"):
        load_data(f"idx:{tmp_path}")


def test_idx_folder_absent(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="IDX data folder .*nowhere' does not exist"):
        load_data(f"idx:{tmp_path / 'nowhere'}")


def test_idx_float_labels_refused(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", (np.arange(12) % 3).astype(">f4"))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte holds float32 values"):
        load_data(f"idx:{tmp_path}")


def test_idx_images_labels_length_mismatch(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="X_test has 6 rows but y_test has 5 labels"):
        load_data(f"idx:{tmp_path}")


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST

_FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def test_fashion_mnist_from_fake_package_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = _write_idx_dir(tmp_path, gz=True, n_train=30, n_test=10, shape=(28, 28))
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


# ---------------------------------------------------------------------------------------------
# stratified subsets


def _check_stratified(y: np.ndarray, rows: np.ndarray, size: int) -> None:
    assert rows.shape == (size,) and np.all(np.diff(rows) > 0)
    assert 0 <= rows[0] and rows[-1] < y.shape[0]
    for c in np.unique(y):
        share = size * np.count_nonzero(y == c) / y.shape[0]
        assert abs(np.count_nonzero(y[rows] == c) - share) < 1, (c, share)


@pytest.mark.parametrize("size", [1, 7, 10, 33, 50, 99, 100])
def test_stratified_indices_class_shares_within_one(size: int) -> None:
    y = np.repeat([3, 0, 2, 1, 7], [41, 29, 17, 8, 5])  # n = 100, unequal classes
    y = np.random.default_rng(5).permutation(y)
    for seed in range(5):
        rows = stratified_indices(y, size, rng=np.random.default_rng(seed))
        _check_stratified(y, rows, size)


def test_stratified_indices_uniform_within_class() -> None:
    # Every row of a class is equally likely: counts over many draws are close to uniform.
    y = np.array([0] * 6 + [1] * 4)
    hits = np.zeros(10)
    for seed in range(3000):
        hits[stratified_indices(y, 5, rng=np.random.default_rng(seed))] += 1
    np.testing.assert_allclose(hits[:6], 3000 * 3 / 6, rtol=0.08)
    np.testing.assert_allclose(hits[6:], 3000 * 2 / 4, rtol=0.08)


def test_digits_subset_rows_come_from_whole_split(digits: Dataset) -> None:
    sub = load_data("digits", seed=0, train_size=300, test_size=120)
    assert (sub.n_train, sub.n_test) == (300, 120)
    _check_stratified(digits.y_train, sub.train_index, 300)
    _check_stratified(digits.y_test, sub.test_index, 120)
    np.testing.assert_array_equal(sub.x_train, digits.x_train[sub.train_index])
    np.testing.assert_array_equal(sub.y_test, digits.y_test[sub.test_index])
    assert not sub.train_index.flags.writeable and sub.train_index.dtype == np.int64


def test_subset_deterministic_in_seed(tmp_path: Path) -> None:
    path = _save_npz(tmp_path, **_arrays(n_train=60, n_test=30))
    a = load_data(path, seed=4, train_size=20, test_size=9)
    b = load_data(path, seed=4, train_size=20, test_size=9)
    c = load_data(path, seed=5, train_size=20, test_size=9)
    np.testing.assert_array_equal(a.train_index, b.train_index)
    np.testing.assert_array_equal(a.test_index, b.test_index)
    assert fingerprint(a) == fingerprint(b)
    assert not np.array_equal(a.train_index, c.train_index)
    assert fingerprint(a) != fingerprint(c)


def test_subset_one_split_only(tmp_path: Path) -> None:
    path = _save_npz(tmp_path, **_arrays(n_train=60, n_test=30))
    whole = load_data(path)
    sub = load_data(path, train_size=21)
    assert sub.n_train == 21 and sub.test_index is None
    np.testing.assert_array_equal(sub.x_test, whole.x_test)
    assert np.bincount(sub.y_train).tolist() == [7, 7, 7]


def test_subset_of_whole_size_is_the_whole_data(digits: Dataset) -> None:
    same = load_data("digits", seed=0, train_size=1297, test_size=500)
    assert same.train_index is None and same.test_index is None
    assert fingerprint(same) == fingerprint(digits)


def test_subset_enters_fingerprint() -> None:
    base = validate(_dataset())
    indexed = validate(_dataset(train_index=np.arange(6) * 2))
    other = validate(_dataset(train_index=np.arange(6) * 2 + 1))
    assert len({fingerprint(base), fingerprint(indexed), fingerprint(other)}) == 3


def test_subset_of_image_folder(tmp_path: Path) -> None:
    for k in range(6):
        _write_png(tmp_path / "train" / "ab"[k % 2] / f"{k}.png", np.full((2, 2), k, np.uint8), "L")
    _write_png(tmp_path / "test" / "a" / "t.png", np.zeros((2, 2), np.uint8), "L")
    sub = load_data(str(tmp_path), seed=1, train_size=4)
    assert sub.train_index is not None and np.bincount(sub.y_train).tolist() == [2, 2]
    np.testing.assert_array_equal(sub.x_train, load_data(str(tmp_path)).x_train[sub.train_index])


def test_subset_of_idx_folder(tmp_path: Path) -> None:
    arrays = _write_idx_dir(tmp_path, n_train=30, n_test=15)
    sub = load_data(f"idx:{tmp_path}", seed=2, train_size=9, test_size=6)
    assert np.bincount(sub.y_train).tolist() == [3, 3, 3]
    assert np.bincount(sub.y_test).tolist() == [2, 2, 2]
    expected = arrays["train-images-idx3-ubyte"][sub.train_index] / 255.0
    np.testing.assert_array_equal(sub.x_train, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_size": 1298}, "--train-size 1298 is more than the 1297 points of the train split"),
        ({"test_size": 501}, "--test-size 501 is more than the 500 points of the test split"),
        ({"train_size": 0}, "--train-size must be a positive integer, got 0"),
        ({"test_size": True}, "--test-size must be a positive integer, got True"),
        ({"train_size": 2.5}, "--train-size must be a positive integer, got 2.5"),
    ],
)
def test_subset_size_out_of_range(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_data("digits", **kwargs)  # type: ignore[arg-type]


def test_validate_refuses_bad_index() -> None:
    with pytest.raises(DataError, match="train_index must be increasing"):
        validate(_dataset(train_index=np.array([0, 2, 1, 3, 4, 5])))
    with pytest.raises(DataError, match=r"test_index must be 1-D integers, one per row \(4\)"):
        validate(_dataset(test_index=np.arange(3)))


# ---------------------------------------------------------------------------------------------
# PyTorch (n, C, H, W) arrays


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_nchw_same_dataset_as_nhwc(tmp_path: Path, channels: int, dtype: type) -> None:
    rng = np.random.default_rng(channels)
    nhwc = {
        "X_train": (rng.random((6, 5, 7, channels)) * 255).astype(dtype),
        "y_train": np.arange(6) % 3,
        "X_test": (rng.random((4, 5, 7, channels)) * 255).astype(dtype),
        "y_test": np.arange(4) % 3,
    }
    nchw = {k: np.ascontiguousarray(v.transpose(0, 3, 1, 2)) if k[0] == "X" else v
            for k, v in nhwc.items()}
    a = load_data(_save_npz(tmp_path, "nhwc.npz", **nhwc))
    b = load_data(_save_npz(tmp_path, "nchw.npz", **nchw))
    assert b.input_shape == (5, 7, channels)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert b.x_train.flags.c_contiguous
    assert fingerprint(a) == fingerprint(b)
    assert b.x_train[2, 4, 1, channels - 1] == a.x_train[2, 4, 1, channels - 1]


def test_nchw_with_subset_same_as_nhwc(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 1, 6, 6), dtype=np.uint8)
    y = np.arange(12) % 3
    a = load_data(_save_npz(tmp_path, "a.npz", X_train=x, y_train=y, X_test=x, y_test=y),
                  train_size=6)
    b = load_data(_save_npz(tmp_path, "b.npz", X_train=x.transpose(0, 2, 3, 1), y_train=y,
                            X_test=x.transpose(0, 2, 3, 1), y_test=y), train_size=6)
    assert fingerprint(a) == fingerprint(b) and a.input_shape == (6, 6, 1)


def test_last_axis_channels_wins_when_ambiguous(tmp_path: Path) -> None:
    # (n, 3, 4, 4): the last axis is a valid channel count, so the array is (n, H, W, C).
    ds = load_data(_save_npz(tmp_path, **_arrays(shape=(3, 4, 4))))
    assert ds.input_shape == (3, 4, 4)
