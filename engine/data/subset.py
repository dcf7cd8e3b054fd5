"""Seeded, stratified subsets of a data set's splits (``--train-size`` / ``--test-size``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.data.dataset import Dataset, _as_labels
from engine.errors import DataError

__all__ = ["stratified_indices", "take_subsets"]

# Mixed into the seed so a subset's draw is independent of other draws from the same seed
# (the digits split uses default_rng(seed)).
_SUBSET_SALT = 0x5B5E7
_SPLIT_CODES = {"train": 0, "test": 1}


def stratified_indices(y: np.ndarray, size: int, *, rng: np.random.Generator) -> np.ndarray:
    """Sorted row numbers of a stratified random sample of ``size`` rows.

    Class ``c`` with ``n_c`` of the ``n`` labels gets ``floor(size * n_c / n)`` rows, and the
    ``size - Σ floor(...)`` rows left over go one each to the classes with the largest
    fractional parts (ties in a random order), so every class count is within 1 of its exact
    share ``size * n_c / n``. Within a class the rows are a uniform random choice.

    Args:
        y: integer labels, shape ``(n,)``.
        size: rows to keep, ``1 <= size <= n``.
        rng: the source of randomness; the same generator state gives the same rows.

    Returns:
        int64 of shape ``(size,)``, strictly increasing.
    """
    n = y.shape[0]
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quota = size * counts // n  # (k,) floor of the exact share
    frac = size * counts % n  # (k,) fractional part of the share, times n
    short = size - int(quota.sum())
    tiebreak = rng.permutation(classes.shape[0])  # (k,)
    quota[np.lexsort((tiebreak, -frac))[:short]] += 1
    keys = rng.random(n)  # (n,) random order within each class
    order = np.lexsort((keys, inverse))  # (n,) rows grouped by class, shuffled within
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))  # (k,) first position of each class
    rank = np.arange(n) - starts[inverse[order]]  # (n,) position of order[j] within its class
    keep = order[rank < quota[inverse[order]]]
    return np.sort(keep).astype(np.int64)


def take_subsets(
    ds: Dataset, *, seed: int, train_size: int | None = None, test_size: int | None = None
) -> Dataset:
    """``ds`` with each split cut to a stratified subset of the given size (None keeps it whole).

    Works on an unvalidated data set whose ``X`` / ``y`` lengths already agree (pixels may still
    be uint8). Split ``s`` draws from ``np.random.default_rng([salt, seed, code(s)])``, so the
    same seed and size give the same rows. Rows keep their original order; ``train_index`` /
    ``test_index`` record which rows were kept (left None when a size equals the split's size,
    so asking for everything gives the whole data set, fingerprint included).

    Raises:
        DataError: a size that is not a positive integer or exceeds the split's size.
    """
    changes: dict[str, np.ndarray] = {}
    for split, size in (("train", train_size), ("test", test_size)):
        if size is None:
            continue
        y = np.asarray(getattr(ds, f"y_{split}"))
        n = int(y.shape[0])
        flag = f"--{split}-size"
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise DataError(f"{flag} must be a positive integer, got {size!r}")
        if size > n:
            raise DataError(
                f"{flag} {size} is more than the {n} points of the {split} split of "
                f"{ds.source!r}; use at most {n}"
            )
        if size == n:
            continue
        rng = np.random.default_rng([_SUBSET_SALT, int(seed), _SPLIT_CODES[split]])
        rows = stratified_indices(_as_labels(f"y_{split}", y), int(size), rng=rng)
        changes[f"x_{split}"] = np.asarray(getattr(ds, f"x_{split}"))[rows]
        changes[f"y_{split}"] = y[rows]
        changes[f"{split}_index"] = rows
    return dataclasses.replace(ds, **changes) if changes else ds
