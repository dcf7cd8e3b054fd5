"""Recorded label noise: a seeded fraction of the training labels flipped to another class.

Mislabel detection is measured against known flips (``influence build --label-noise F``): the
flipped data set keeps the labels it was loaded with in ``clean_y_train``, so every score that
ranks likely mislabelled points (self-influence, the training loss, the gradient norm) can be
scored by AUC and recall against ``Dataset.flipped``. The flips are part of the data: the
fingerprint covers the flipped ``y_train``, and reopening the run flips the same rows again.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.errors import DataError

from .dataset import Dataset, validate

__all__ = ["flip_labels"]

_NOISE_SEED = 0x4C4E  # the flips' stream, apart from the subsets' (same --seed, different draws)


def flip_labels(ds: Dataset, fraction: float, *, seed: int) -> Dataset:
    """``ds`` with ``round(fraction · n_train)`` seeded training labels moved to another class.

    Each flipped row takes a label drawn uniformly from the other ``C − 1`` classes. The test
    split is untouched. ``fraction`` 0 returns ``ds`` itself.

    Raises:
        DataError: ``fraction`` outside [0, 1), or ``ds`` already flipped.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"label noise must be a fraction in [0, 1), got {fraction!r}")
    if fraction == 0.0:
        return ds
    if ds.clean_y_train is not None:
        raise DataError("the data set's labels are already flipped")
    n, c = ds.n_train, ds.n_classes
    rng = np.random.default_rng([seed, _NOISE_SEED])
    rows = np.sort(rng.choice(n, size=round(fraction * n), replace=False))  # (k,)
    clean = np.asarray(ds.y_train)
    y = clean.copy()
    y[rows] = (clean[rows] + rng.integers(1, c, size=rows.size)) % c  # never the same class
    return validate(dataclasses.replace(ds, y_train=y, clean_y_train=clean))
