"""The in-memory data set every other layer reads, its checks and its fingerprint.

A :class:`Dataset` holds four read-only, C-contiguous arrays. Index ``i`` in every output of the
engine means row ``i`` of ``x_train`` / ``y_train`` (or of ``x_test`` / ``y_test``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import DataError

__all__ = [
    "MAX_DERIVED_CLASSES",
    "Dataset",
    "derived_class_names",
    "fingerprint",
    "from_splits",
    "validate",
]

# Field name -> the name users know from the ``.npz`` format (and that messages use).
_ARRAY_NAMES: dict[str, str] = {
    "x_train": "X_train",
    "y_train": "y_train",
    "x_test": "X_test",
    "y_test": "y_test",
}
_SPLITS = ("train", "test")
_MAX_CHANNELS = 4
_INDEX_FIELDS = ("train_index", "test_index")
# Without class_names, C = max label + 1; this bound stops a stray huge label from asking for
# millions of class names.
MAX_DERIVED_CLASSES = 100_000
_FINGERPRINT_VERSION = b"engine.data.fingerprint/v1\n"


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A classification data set split into train and test.

    Attributes:
        x_train: float64, shape ``(n_train, *input_shape)``; ``input_shape`` is ``(d,)``,
            ``(H, W)`` or ``(H, W, C)`` with ``C`` in 1..4.
        y_train: int64, shape ``(n_train,)``, values in ``0..n_classes-1``.
        x_test: float64, shape ``(n_test, *input_shape)``.
        y_test: int64, shape ``(n_test,)``, values in ``0..n_classes-1``.
        class_names: one name per class; label ``k`` means ``class_names[k]``.
        source: where the data came from: the ``--data`` spec as given (``"digits"``,
            ``"fashion-mnist"``, ``"idx:DIR"``, the ``.npz`` path or the folder path).
        train_index: None when ``x_train`` is the whole train split of the source; for a subset
            (``--train-size``), int64 of shape ``(n_train,)``, increasing: row ``i`` is row
            ``train_index[i]`` of the whole split. Part of the fingerprint when set.
        test_index: the same for the test split (``--test-size``).
        clean_y_train: None unless labels were flipped on purpose (``--label-noise``,
            :func:`engine.data.noise.flip_labels`): then the labels as loaded, int64 of shape
            ``(n_train,)``, and ``y_train`` holds the flipped ones (:attr:`flipped` says which).

    Build one through :func:`validate` (the loaders do), which checks every field and returns a
    copy whose arrays are read-only and C-contiguous. Equality is identity (arrays have no
    single truth value); compare data sets with :func:`fingerprint`.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str
    train_index: np.ndarray | None = None
    test_index: np.ndarray | None = None
    clean_y_train: np.ndarray | None = None

    @property
    def flipped(self) -> np.ndarray:
        """Ids of the training points whose label was flipped (int64, increasing; empty if none)."""
        if self.clean_y_train is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.clean_y_train != self.y_train).astype(np.int64)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, ``x_train.shape[1:]``."""
        return tuple(int(s) for s in self.x_train.shape[1:])

    @property
    def n_classes(self) -> int:
        """Number of classes, ``len(class_names)``."""
        return len(self.class_names)

    @property
    def n_train(self) -> int:
        """Number of training points."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test points."""
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        subset = "" if self.train_index is None and self.test_index is None else ", subset"
        return (
            f"Dataset(source={self.source!r}, n_train={self.n_train}, n_test={self.n_test}, "
            f"input_shape={self.input_shape}, n_classes={self.n_classes}{subset})"
        )


def fingerprint(ds: Dataset) -> str:
    """SHA-256 hex digest of the data: each array's dtype, shape and bytes, plus the class names.

    A subset's ``train_index`` / ``test_index`` (which rows of the whole splits it holds) are
    hashed too when set; a whole data set hashes as it did before subsets existed. The
    ``source`` is not part of it, so the same data loaded from two places has one fingerprint.
    The digest is stable across processes and machines of the same byte order.
    """
    h = hashlib.sha256(_FINGERPRINT_VERSION)
    for field, name in _ARRAY_NAMES.items():
        a = np.ascontiguousarray(getattr(ds, field))
        h.update(f"{name}:{a.dtype.str}:{tuple(a.shape)}\n".encode())
        h.update(a.data if a.size else b"")
    h.update(json.dumps(list(ds.class_names), ensure_ascii=False).encode())
    for field in _INDEX_FIELDS:
        index = getattr(ds, field)
        if index is not None:
            a = np.ascontiguousarray(index, dtype="<i8")
            h.update(f"\n{field}:{a.shape[0]}\n".encode())
            h.update(a.data if a.size else b"")
    return h.hexdigest()


def validate(ds: Dataset) -> Dataset:
    """Check a data set and return a copy with float64 / int64, read-only, C-contiguous arrays.

    ``X`` may be any float dtype (cast to float64, values untouched); ``y`` any integer dtype or
    a float dtype whose values are all integral (cast to int64).

    Raises:
        DataError: one line naming the array or split and the problem: a missing array, ``X``
            not 2-4 dimensional, ``X`` and ``y`` lengths differ, an empty split, train and test
            feature shapes differ, ``y`` not 1-D, NaN or inf in ``X``, a label outside
            ``0..C-1`` (``C = len(class_names)``), fewer than 2 classes present in train, or
            a ``train_index`` / ``test_index`` that is not increasing non-negative integers,
            one per row.
    """
    if not isinstance(ds, Dataset):
        raise DataError(f"expected a Dataset, got {type(ds).__name__}")
    _check_present(ds)
    raw = {field: np.asarray(getattr(ds, field)) for field in _ARRAY_NAMES}
    for split in _SPLITS:
        _check_shapes(split, raw[f"x_{split}"], raw[f"y_{split}"])
    if raw["x_train"].shape[1:] != raw["x_test"].shape[1:]:
        raise DataError(
            f"train and test feature shapes differ: X_train rows are {raw['x_train'].shape[1:]}, "
            f"X_test rows are {raw['x_test'].shape[1:]}"
        )
    xs = {split: _as_features(split, raw[f"x_{split}"]) for split in _SPLITS}
    ys = {split: _as_labels(f"y_{split}", raw[f"y_{split}"]) for split in _SPLITS}
    class_names = _as_class_names(ds.class_names)
    _check_label_range(class_names, ys)
    indexes = {split: _as_index(split, getattr(ds, f"{split}_index"), n=ys[split].shape[0])
               for split in _SPLITS}
    present = np.unique(ys["train"])
    if present.size < 2:
        raise DataError(
            f"train split has only {present.size} class present (label {int(present[0])}); "
            "need at least 2 classes"
        )
    return Dataset(
        x_train=_frozen(xs["train"], np.float64),
        y_train=_frozen(ys["train"], np.int64),
        x_test=_frozen(xs["test"], np.float64),
        y_test=_frozen(ys["test"], np.int64),
        class_names=class_names,
        source=str(ds.source),
        train_index=indexes["train"],
        test_index=indexes["test"],
        clean_y_train=None if ds.clean_y_train is None
        else _frozen(_as_labels("clean_y_train", np.asarray(ds.clean_y_train)), np.int64),
    )


def from_splits(
    xs: Mapping[str, np.ndarray],
    ys: Mapping[str, np.ndarray],
    *,
    class_names: tuple[str, ...],
    source: str,
) -> Dataset:
    """An unvalidated :class:`Dataset` from ``{"train": X, "test": X}`` and the same for ``y``."""
    return Dataset(
        x_train=xs["train"],
        y_train=ys["train"],
        x_test=xs["test"],
        y_test=ys["test"],
        class_names=class_names,
        source=source,
    )


def derived_class_names(y_train: np.ndarray, y_test: np.ndarray) -> tuple[str, ...]:
    """``("0", ..., str(C-1))`` with ``C`` the largest label over both splits plus one.

    Raises:
        DataError: a label is not an integer, or ``C`` exceeds :data:`MAX_DERIVED_CLASSES`.
    """
    labels = [
        _as_labels(name, np.asarray(y))
        for name, y in (("y_train", y_train), ("y_test", y_test))
        if np.ndim(y) == 1 and np.size(y)
    ]
    if not labels:
        return ()  # validate reports the empty or misshapen split
    top = max(int(y.max()) for y in labels)
    if top + 1 > MAX_DERIVED_CLASSES:
        raise DataError(
            f"largest label is {top}; without class_names at most {MAX_DERIVED_CLASSES} "
            "classes (labels 0..C-1) are accepted"
        )
    return tuple(str(k) for k in range(top + 1))


def _as_index(split: str, index: Any, *, n: int) -> np.ndarray | None:
    """A subset's row numbers as a frozen int64 ``(n,)`` array, or None for a whole split."""
    if index is None:
        return None
    a = np.asarray(index)
    name = f"{split}_index"
    if a.ndim != 1 or a.shape[0] != n or (a.size and a.dtype.kind not in "iu"):
        raise DataError(
            f"{name} must be 1-D integers, one per row ({n}); got dtype {a.dtype}, shape {a.shape}"
        )
    a = a.astype(np.int64)
    if a.size and (a[0] < 0 or np.any(np.diff(a) <= 0)):
        raise DataError(f"{name} must be increasing non-negative row numbers")
    return _frozen(a, np.int64)


def _check_present(ds: Dataset) -> None:
    missing = [name for field, name in _ARRAY_NAMES.items() if getattr(ds, field) is None]
    if missing:
        found = [name for field, name in _ARRAY_NAMES.items() if getattr(ds, field) is not None]
        raise DataError(
            f"missing arrays: {', '.join(missing)} (found: {', '.join(found) or 'none'})"
        )


def _check_shapes(split: str, x: np.ndarray, y: np.ndarray) -> None:
    xname, yname = f"X_{split}", f"y_{split}"
    if x.ndim not in (2, 3, 4):
        raise DataError(
            f"{xname} must have 2, 3 or 4 dimensions, (n, d), (n, H, W) or (n, H, W, C); "
            f"got shape {x.shape}"
        )
    if x.ndim == 4 and not 1 <= x.shape[-1] <= _MAX_CHANNELS:
        raise DataError(
            f"{xname} has {x.shape[-1]} channels in shape {x.shape}; expected (n, H, W, C) "
            f"with C in 1..{_MAX_CHANNELS} (or, in a .npz, (n, C, H, W) with C in 1, 3, 4)"
        )
    if y.ndim != 1:
        raise DataError(f"{yname} must be 1-D, shape (n,); got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{xname} has {x.shape[0]} rows but {yname} has {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise DataError(f"{split} split is empty ({xname} has 0 rows)")
    if 0 in x.shape[1:]:
        raise DataError(f"{xname} has an empty feature dimension in shape {x.shape}")


def _as_features(split: str, x: np.ndarray) -> np.ndarray:
    name = f"X_{split}"
    if x.dtype.kind != "f":
        raise DataError(
            f"{name} has dtype {x.dtype}; expected a float array "
            "(the loaders divide uint8 arrays by 255)"
        )
    x = x.astype(np.float64, copy=False)
    n_bad = int(np.count_nonzero(~np.isfinite(x)))
    if n_bad:
        raise DataError(f"{name} ({split} split) has {n_bad} NaN or inf values")
    return x


def _as_labels(name: str, y: np.ndarray) -> np.ndarray:
    """Labels as int64, shape ``(n,)``; integer dtypes or floats with integral values only."""
    if y.dtype.kind in "iu":
        if y.size and y.dtype.kind == "u" and int(y.max()) > np.iinfo(np.int64).max:
            raise DataError(f"{name} has label {int(y.max())}, too large for a class index")
        return y.astype(np.int64, copy=False)
    if y.dtype.kind == "f":
        finite = np.isfinite(y)
        if not finite.all():
            raise DataError(f"{name} has {int(np.count_nonzero(~finite))} NaN or inf labels")
        fractional = y != np.floor(y)
        if fractional.any():
            value = y[np.argmax(fractional)].item()
            raise DataError(f"{name} has non-integer label {value}; labels must be integers")
        if y.size and np.abs(y).max() > 2.0**62:
            raise DataError(f"{name} has label {np.abs(y).max():g}, too large for a class index")
        return y.astype(np.int64)
    raise DataError(f"{name} has dtype {y.dtype}; expected integer labels")


def _as_class_names(names: Any) -> tuple[str, ...]:
    if isinstance(names, str) or not hasattr(names, "__iter__"):
        raise DataError(f"class_names must be a sequence of strings, got {type(names).__name__}")
    out = tuple(names)
    bad = [n for n in out if not isinstance(n, str)]
    if bad:
        raise DataError(f"class_names must be strings; got {bad[0]!r} ({type(bad[0]).__name__})")
    out = tuple(str(n) for n in out)  # plain str, not numpy.str_
    if len(set(out)) != len(out):
        dup = next(n for n in out if out.count(n) > 1)
        raise DataError(f"class_names has duplicate name {dup!r}")
    return out


def _check_label_range(class_names: tuple[str, ...], ys: dict[str, np.ndarray]) -> None:
    n_classes = len(class_names)
    for split in _SPLITS:
        y = ys[split]
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise DataError(
                f"y_{split} ({split} split) has label {lo} outside 0..{n_classes - 1}"
            )
        if hi >= n_classes:
            raise DataError(
                f"y_{split} ({split} split) has label {hi} outside 0..{n_classes - 1}: "
                f"class_names has {n_classes} names, need at least {hi + 1}"
            )


def _frozen(a: np.ndarray, dtype: type[np.generic]) -> np.ndarray:
    """A read-only, C-contiguous array of ``dtype`` that no caller can write through."""
    if a.dtype == dtype and a.flags.c_contiguous and a.flags.owndata and not a.flags.writeable:
        return a
    out = np.array(a, dtype=dtype, order="C", copy=True)
    out.setflags(write=False)
    return out
