"""engine.data's seeded stratified train/test subsets (train_size/test_size, recorded row indices)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.data import Dataset, fingerprint, load_data, validate
from engine.data.subset import stratified_indices
from engine.errors import DataError
from tests.engine.data_helpers import make_arrays, make_dataset, save_npz, write_idx_dir, write_png


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_data("digits", seed=0)


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
    path = save_npz(tmp_path, **make_arrays(n_train=60, n_test=30))
    a = load_data(path, seed=4, train_size=20, test_size=9)
    b = load_data(path, seed=4, train_size=20, test_size=9)
    c = load_data(path, seed=5, train_size=20, test_size=9)
    np.testing.assert_array_equal(a.train_index, b.train_index)
    np.testing.assert_array_equal(a.test_index, b.test_index)
    assert fingerprint(a) == fingerprint(b)
    assert not np.array_equal(a.train_index, c.train_index)
    assert fingerprint(a) != fingerprint(c)


def test_subset_one_split_only(tmp_path: Path) -> None:
    path = save_npz(tmp_path, **make_arrays(n_train=60, n_test=30))
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
    base = validate(make_dataset())
    indexed = validate(make_dataset(train_index=np.arange(6) * 2))
    other = validate(make_dataset(train_index=np.arange(6) * 2 + 1))
    assert len({fingerprint(base), fingerprint(indexed), fingerprint(other)}) == 3


def test_subset_of_image_folder(tmp_path: Path) -> None:
    for k in range(6):
        write_png(tmp_path / "train" / "ab"[k % 2] / f"{k}.png", np.full((2, 2), k, np.uint8), "L")
    write_png(tmp_path / "test" / "a" / "t.png", np.zeros((2, 2), np.uint8), "L")
    sub = load_data(str(tmp_path), seed=1, train_size=4)
    assert sub.train_index is not None and np.bincount(sub.y_train).tolist() == [2, 2]
    np.testing.assert_array_equal(sub.x_train, load_data(str(tmp_path)).x_train[sub.train_index])


def test_subset_of_idx_folder(tmp_path: Path) -> None:
    arrays = write_idx_dir(tmp_path, n_train=30, n_test=15)
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
        validate(make_dataset(train_index=np.array([0, 2, 1, 3, 4, 5])))
    with pytest.raises(DataError, match=r"test_index must be 1-D integers, one per row \(4\)"):
        validate(make_dataset(test_index=np.arange(3)))
