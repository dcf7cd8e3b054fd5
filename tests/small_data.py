"""A small, learnable, standardised 3-class .npz shared by the CLI and run-file tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_TRAIN, N_TEST, N_FEATURES, N_CLASSES = 120, 40, 6, 3
N_PARAMS = N_FEATURES * N_CLASSES + N_CLASSES  # logreg: weights + biases


def write_npz(path: Path, *, seed: int = 0, nan: bool = False) -> Path:
    """Class c shifts feature c by +1.5; ``nan`` plants one NaN in X_train."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, N_CLASSES, n)
        x = rng.normal(size=(n, N_FEATURES))
        x[np.arange(n), y] += 1.5
        return (x - x.mean(0)) / x.std(0), y

    x_train, y_train = split(N_TRAIN)
    x_test, y_test = split(N_TEST)
    if nan:
        x_train[4, 2] = np.nan
    np.savez(path, X_train=x_train, y_train=y_train, X_test=x_test, y_test=y_test)
    return path


def write_blobs(path: Path, *, n_train: int = 150, n_test: int = 40, d: int = 6, c: int = 3,
                seed: int = 0) -> Path:
    """A standardised float64 Gaussian-blob classification problem as an .npz."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=1.5, size=(c, d))
    y = rng.integers(0, c, size=n_train + n_test)
    x = centers[y] + rng.normal(size=(len(y), d))
    x = (x - x.mean(0)) / x.std(0)
    np.savez(path, X_train=x[:n_train], y_train=y[:n_train], X_test=x[n_train:], y_test=y[n_train:])
    return path
