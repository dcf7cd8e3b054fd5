"""Data sets for the engine: loading ``--data`` specs, checking them, fingerprinting them.

``load_data("digits" | "fashion-mnist" | "idx:DIR" | "PATH.npz" | "PATH/", seed=0,
train_size=None, test_size=None)`` returns a validated :class:`Dataset` (float64 ``X`` of shape
``(n, *input_shape)``, int64 ``y`` of shape ``(n,)``, read-only arrays), optionally a seeded
stratified subset of each split.
"""

from __future__ import annotations

from engine.data.dataset import Dataset, fingerprint, validate
from engine.data.idx import FASHION_MNIST, IDX_PREFIX
from engine.data.loaders import DIGITS, load_data

BUILTIN_DATA = (DIGITS, FASHION_MNIST)  # data names that are not paths

__all__ = ["BUILTIN_DATA", "IDX_PREFIX", "Dataset", "fingerprint", "load_data", "validate"]
