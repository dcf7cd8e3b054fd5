"""Recorded label noise (--label-noise): seeded flips, recorded, reproduced on reopen."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.data import load_data
from engine.data.noise import flip_labels
from engine.errors import DataError, InfluenceError


def test_flips_the_asked_fraction_to_other_classes_and_keeps_the_clean_labels() -> None:
    ds = load_data("digits", seed=3)
    noisy = flip_labels(ds, 0.1, seed=3)
    flipped = noisy.flipped
    assert flipped.size == round(0.1 * ds.n_train)
    assert np.array_equal(noisy.clean_y_train, ds.y_train)
    assert np.all(noisy.y_train[flipped] != ds.y_train[flipped])  # never the same class
    keep = np.setdiff1d(np.arange(ds.n_train), flipped)
    assert np.array_equal(noisy.y_train[keep], ds.y_train[keep])
    assert np.array_equal(noisy.y_test, ds.y_test)
    assert set(np.unique(noisy.y_train[flipped])) - {ds.y_train[flipped][0]}  # several new classes
    again = load_data("digits", seed=3, label_noise=0.1)
    assert np.array_equal(again.y_train, noisy.y_train)  # seeded
    other = load_data("digits", seed=4, label_noise=0.1)
    assert not np.array_equal(np.sort(other.flipped), np.sort(flipped)) or other.n_train != ds.n_train
    assert ds.flipped.size == 0 and ds.clean_y_train is None


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_a_fraction_outside_zero_one_is_refused(bad: float) -> None:
    with pytest.raises(DataError, match="label noise"):
        load_data("digits", label_noise=bad)


def test_a_run_records_its_flips_and_reopens_with_them(tmp_path) -> None:
    run = engine.build("digits", "logreg", tmp_path / "run", label_noise=0.2, train_size=200,
                       test_size=50, ihvp="exact", progress=False)
    assert run.info.data.label_noise == 0.2 and run.info.data.n_flipped == 40
    reopened = engine.open_run(tmp_path / "run")
    assert np.array_equal(reopened.dataset.flipped, run.dataset.flipped)
    assert np.array_equal(reopened.data.y_train.cpu().numpy(), run.dataset.y_train)
    with pytest.raises(InfluenceError, match="label-noise"):
        engine.build("digits", "logreg", tmp_path / "bad", label_noise=1.0, progress=False)
