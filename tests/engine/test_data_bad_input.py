"""engine.data on bad input: one test each, every one a DataError whose message names the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.data import load_data, validate
from engine.errors import DataError
from tests.engine.data_helpers import make_arrays, make_dataset, save_npz, write_png

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
    a = make_arrays()
    del a["X_test"], a["y_test"]
    msg = r"missing arrays: X_test, y_test \(found: X_train, y_train"
    with pytest.raises(DataError, match=msg):
        load_data(save_npz(tmp_path, **a))


def test_validate_missing_arrays() -> None:
    with pytest.raises(DataError, match=r"missing arrays: y_test \(found: X_train"):
        validate(make_dataset(y_test=None))


def test_npz_pickled_object_array(tmp_path: Path) -> None:
    a = make_arrays()
    a["y_train"] = np.array([0, 1, "2", None, 1, 0], dtype=object)
    path = tmp_path / "obj.npz"
    np.savez(path, allow_pickle=True, **a)
    with pytest.raises(DataError, match="array 'y_train' .* cannot be loaded without pickle"):
        load_data(str(path))


def test_npz_integer_x_refused(tmp_path: Path) -> None:
    a = make_arrays()
    a["X_train"] = np.ones((6, 3), dtype=np.int32)
    with pytest.raises(DataError, match="X_train has dtype int32; expected a float array or uint8"):
        load_data(save_npz(tmp_path, **a))


@pytest.mark.parametrize("shape", [(6,), (6, 2, 2, 2, 2)])
def test_x_wrong_ndim(tmp_path: Path, shape: tuple[int, ...]) -> None:
    a = make_arrays()
    a["X_train"] = np.zeros(shape)
    with pytest.raises(DataError, match="X_train must have 2, 3 or 4 dimensions"):
        load_data(save_npz(tmp_path, **a))


def test_x_too_many_channels(tmp_path: Path) -> None:
    a = make_arrays(shape=(2, 2, 5))
    with pytest.raises(DataError, match="X_train has 5 channels"):
        load_data(save_npz(tmp_path, **a))


def test_x_y_length_mismatch(tmp_path: Path) -> None:
    a = make_arrays()
    a["y_test"] = a["y_test"][:3]
    with pytest.raises(DataError, match="X_test has 4 rows but y_test has 3 labels"):
        load_data(save_npz(tmp_path, **a))


def test_feature_shapes_differ(tmp_path: Path) -> None:
    a = make_arrays()
    a["X_test"] = np.zeros((4, 5))
    with pytest.raises(DataError, match=r"train and test feature shapes differ.*\(3,\).*\(5,\)"):
        load_data(save_npz(tmp_path, **a))


def test_y_not_1d(tmp_path: Path) -> None:
    a = make_arrays()
    a["y_train"] = a["y_train"].reshape(6, 1)
    with pytest.raises(DataError, match=r"y_train must be 1-D.*got shape \(6, 1\)"):
        load_data(save_npz(tmp_path, **a))


def test_label_negative(tmp_path: Path) -> None:
    a = make_arrays()
    a["y_test"][2] = -1
    with pytest.raises(DataError, match=r"y_test \(test split\) has label -1 outside 0\.\.2"):
        load_data(save_npz(tmp_path, **a))


def test_label_not_integer(tmp_path: Path) -> None:
    a = make_arrays()
    a["y_train"] = a["y_train"].astype(np.float64)
    a["y_train"][1] = 1.5
    with pytest.raises(DataError, match="y_train has non-integer label 1.5"):
        load_data(save_npz(tmp_path, **a))


def test_class_names_too_short(tmp_path: Path) -> None:
    a = make_arrays()
    msg = r"label 2 outside 0\.\.1: class_names has 2 names, need at least 3"
    with pytest.raises(DataError, match=msg):
        load_data(save_npz(tmp_path, class_names=np.array(["a", "b"]), **a))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_x(tmp_path: Path, bad: float) -> None:
    a = make_arrays()
    a["X_test"][0, 0] = bad
    a["X_test"][3, 2] = bad
    with pytest.raises(DataError, match=r"X_test \(test split\) has 2 NaN or inf values"):
        load_data(save_npz(tmp_path, **a))


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_split(tmp_path: Path, split: str) -> None:
    a = make_arrays()
    a[f"X_{split}"] = a[f"X_{split}"][:0]
    a[f"y_{split}"] = a[f"y_{split}"][:0]
    with pytest.raises(DataError, match=f"{split} split is empty"):
        load_data(save_npz(tmp_path, **a))


def test_single_class_in_train(tmp_path: Path) -> None:
    a = make_arrays()
    a["y_train"][:] = 1
    with pytest.raises(DataError, match="train split has only 1 class present"):
        load_data(save_npz(tmp_path, **a))


def test_duplicate_class_names() -> None:
    with pytest.raises(DataError, match="duplicate name 'a'"):
        validate(make_dataset(class_names=("a", "b", "a")))


def test_image_folder_missing_test_subfolder(tmp_path: Path) -> None:
    write_png(tmp_path / "train" / "a" / "x.png", np.zeros((2, 2), np.uint8), "L")
    with pytest.raises(DataError, match="has no test/ subfolder"):
        load_data(str(tmp_path))


def test_image_folder_test_class_not_in_train(tmp_path: Path) -> None:
    px = np.zeros((2, 2), np.uint8)
    for rel in ["train/a/1.png", "train/b/1.png", "test/a/1.png", "test/c/1.png"]:
        write_png(tmp_path / rel, px, "L")
    with pytest.raises(DataError, match="test class 'c' .* has no folder in train/"):
        load_data(str(tmp_path))


def test_image_folder_size_mismatch(tmp_path: Path) -> None:
    write_png(tmp_path / "train" / "a" / "1.png", np.zeros((2, 2), np.uint8), "L")
    write_png(tmp_path / "train" / "b" / "1.png", np.zeros((2, 2), np.uint8), "L")
    write_png(tmp_path / "test" / "b" / "2.png", np.zeros((3, 2), np.uint8), "L")
    with pytest.raises(DataError, match=r"image '.*test/b/2\.png' is 2x3 \(WxH\) but .* is 2x2"):
        load_data(str(tmp_path))


def test_image_folder_corrupt_image(tmp_path: Path) -> None:
    write_png(tmp_path / "train" / "a" / "1.png", np.zeros((2, 2), np.uint8), "L")
    write_png(tmp_path / "train" / "b" / "1.png", np.zeros((2, 2), np.uint8), "L")
    (tmp_path / "test" / "a").mkdir(parents=True)
    (tmp_path / "test" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"cannot read image '.*broken\.png'"):
        load_data(str(tmp_path))


def test_image_folder_no_images(tmp_path: Path) -> None:
    write_png(tmp_path / "train" / "a" / "1.png", np.zeros((2, 2), np.uint8), "L")
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="test split is empty: no .png/.jpg/.jpeg files"):
        load_data(str(tmp_path))
