"""Tests for engine.data: the digits loader, .npz files, image folders, PyTorch (n, C, H, W) arrays
and the fingerprint. Bad input, IDX/Fashion-MNIST and subsets are in the test_data_*.py modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import Dataset, fingerprint, load_data, validate
from tests.engine.data_helpers import make_arrays, make_dataset, save_npz, write_png

ROOT = Path(__file__).resolve().parents[2]


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
    ds = validate(make_dataset(x_train=x))
    assert x.flags.writeable
    x[0, 0] = 123.0
    assert ds.x_train[0, 0] != 123.0
    again = validate(ds)
    assert again.x_train is ds.x_train


# ---------------------------------------------------------------------------------------------
# npz


def test_npz_float_kept_bitwise(tmp_path: Path) -> None:
    a = make_arrays()
    a["X_train"][0, 0] = 1e-300  # would not survive any rescaling
    a["X_test"][1, 2] = -7.123456789012345
    ds = load_data(save_npz(tmp_path, **a))
    assert ds.x_train.tobytes() == a["X_train"].tobytes()
    assert ds.x_test.tobytes() == a["X_test"].tobytes()
    np.testing.assert_array_equal(ds.y_train, a["y_train"])
    assert ds.class_names == ("0", "1", "2")


def test_npz_float32_cast_exactly(tmp_path: Path) -> None:
    a = make_arrays()
    a["X_train"] = a["X_train"].astype(np.float32)
    ds = load_data(save_npz(tmp_path, **a))
    assert ds.x_train.dtype == np.float64
    np.testing.assert_array_equal(ds.x_train, a["X_train"].astype(np.float64))


def test_npz_uint8_divided_by_255(tmp_path: Path) -> None:
    a = make_arrays(shape=(2, 2))
    rng = np.random.default_rng(1)
    a["X_train"] = rng.integers(0, 256, size=(6, 2, 2), dtype=np.uint8)
    a["X_test"] = rng.integers(0, 256, size=(4, 2, 2), dtype=np.uint8)
    a["X_test"][0, 0, 0] = 255
    ds = load_data(save_npz(tmp_path, **a))
    np.testing.assert_array_equal(ds.x_train, a["X_train"] / 255.0)
    assert ds.x_test[0, 0, 0] == 1.0


@pytest.mark.parametrize("shape", [(5,), (4, 3), (4, 3, 1), (4, 3, 3), (2, 2, 4)])
def test_npz_input_shapes(tmp_path: Path, shape: tuple[int, ...]) -> None:
    ds = load_data(save_npz(tmp_path, **make_arrays(shape=shape)))
    assert ds.input_shape == shape
    assert ds.x_train.shape == (6, *shape) and ds.x_test.shape == (4, *shape)


def test_npz_class_names_kept(tmp_path: Path) -> None:
    names = np.array(["cat", "dog", "bird", "fish"])
    ds = load_data(save_npz(tmp_path, class_names=names, **make_arrays()))
    assert ds.class_names == ("cat", "dog", "bird", "fish")
    assert all(type(n) is str for n in ds.class_names)
    assert ds.n_classes == 4


def test_npz_float_labels_integral_accepted(tmp_path: Path) -> None:
    a = make_arrays()
    a["y_train"] = a["y_train"].astype(np.float32)
    ds = load_data(save_npz(tmp_path, **a))
    assert ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.y_train, np.arange(6) % 3)


def test_npz_source_is_path_as_given(tmp_path: Path) -> None:
    path = save_npz(tmp_path, **make_arrays())
    assert load_data(path).source == path


# ---------------------------------------------------------------------------------------------
# image folder


def test_image_folder_grayscale_round_trip(tmp_path: Path) -> None:
    values = {"a": 0, "b": 51, "c": 102, "d": 255, "e": 153}
    px = {name: np.full((3, 2), v, dtype=np.uint8) for name, v in values.items()}
    write_png(tmp_path / "train" / "zebra" / "b.png", px["b"], "L")
    write_png(tmp_path / "train" / "zebra" / "a.PNG", px["a"], "L")
    write_png(tmp_path / "train" / "ant" / "z.png", px["c"], "L")
    write_png(tmp_path / "test" / "zebra" / "x.png", px["d"], "L")
    write_png(tmp_path / "test" / "ant" / "y.png", px["e"], "L")
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
    write_png(tmp_path / "train" / "0" / "a.png", rgb, "RGB")
    write_png(tmp_path / "train" / "1" / "b.png", gray, "L")
    write_png(tmp_path / "test" / "1" / "c.png", gray, "L")
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
    base = validate(make_dataset())
    x = base.x_train.copy()
    x[2, 1] = np.nextafter(x[2, 1], np.inf)
    y = base.y_test.copy()
    y[0] = (y[0] + 1) % 3
    digests = {
        fingerprint(base),
        fingerprint(validate(make_dataset(x_train=x))),
        fingerprint(validate(make_dataset(y_test=y))),
        fingerprint(validate(make_dataset(class_names=("a", "b", "C")))),
    }
    assert len(digests) == 4
    assert fingerprint(validate(make_dataset(source="elsewhere"))) == fingerprint(base)


def test_fingerprint_of_whole_data_unchanged_by_subset_support(digits: Dataset) -> None:
    # Runs built before subsets existed stored this digest; a whole data set must keep it.
    assert fingerprint(digits) == (
        "cd7c8443859f29dfb7d3fd3184d0cdf94d31756bae711e4b14ebd911fd4c2e27"
    )


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
    a = load_data(save_npz(tmp_path, "nhwc.npz", **nhwc))
    b = load_data(save_npz(tmp_path, "nchw.npz", **nchw))
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
    a = load_data(save_npz(tmp_path, "a.npz", X_train=x, y_train=y, X_test=x, y_test=y),
                  train_size=6)
    b = load_data(save_npz(tmp_path, "b.npz", X_train=x.transpose(0, 2, 3, 1), y_train=y,
                            X_test=x.transpose(0, 2, 3, 1), y_test=y), train_size=6)
    assert fingerprint(a) == fingerprint(b) and a.input_shape == (6, 6, 1)


def test_last_axis_channels_wins_when_ambiguous(tmp_path: Path) -> None:
    # (n, 3, 4, 4): the last axis is a valid channel count, so the array is (n, H, W, C).
    ds = load_data(save_npz(tmp_path, **make_arrays(shape=(3, 4, 4))))
    assert ds.input_shape == (3, 4, 4)
