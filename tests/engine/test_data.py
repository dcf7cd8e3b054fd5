"""Tests for engine.data: the three loaders, validation messages and the fingerprint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import Dataset, fingerprint, load_data, validate
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
