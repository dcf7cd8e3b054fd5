"""Tiny float64 fixtures for the engine's math tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import engine


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


@pytest.fixture(scope="session")
def blobs_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_blobs(tmp_path_factory.mktemp("data") / "blobs.npz")


@pytest.fixture(scope="session")
def blobs_run(tmp_path_factory: pytest.TempPathFactory, blobs_npz: Path) -> engine.Run:
    return engine.build(str(blobs_npz), "logreg", tmp_path_factory.mktemp("runs") / "blobs",
                        weight_decay=1e-2, progress=False)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> engine.Run:
    return engine.build("digits", "logreg", tmp_path_factory.mktemp("runs") / "digits",
                        weight_decay=1e-2, progress=False)
