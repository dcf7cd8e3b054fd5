"""Tiny float64 fixtures for the engine's math tests."""

from __future__ import annotations

from pathlib import Path

import pytest

import engine
from tests.small_data import write_blobs


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
