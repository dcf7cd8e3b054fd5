"""The mislabel check: AUC and recall@p% of self-influence, loss and gradient norm against flips."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import engine
from engine.errors import InfluenceError
from engine.mislabel import (
    MISLABEL_FILE,
    MislabelScore,
    load_mislabel,
    mislabel_check,
    recall_at,
    roc_auc,
    top_count,
)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    positive = rng.random(200) < 0.15
    score = rng.integers(0, 6, 200) + 1.5 * positive  # few distinct values: many ties
    assert roc_auc(score, positive) == pytest.approx(roc_auc_score(positive, score), abs=1e-12)
    smooth = rng.normal(size=200) + positive
    assert roc_auc(smooth, positive) == pytest.approx(roc_auc_score(positive, smooth), abs=1e-12)


def test_auc_extremes_and_all_ties() -> None:
    positive = np.array([True, True, False, False, False])
    assert roc_auc(np.array([9.0, 8, 3, 2, 1]), positive) == 1.0
    assert roc_auc(np.array([0.0, 1, 3, 2, 4]), positive) == 0.0
    assert roc_auc(np.ones(5), positive) == 0.5  # every pair tied: one half each
    with pytest.raises(InfluenceError):
        roc_auc(np.ones(3), np.zeros(3, dtype=bool))


def test_recall_at_percent_by_hand() -> None:
    score = np.array([10.0, 9, 8, 7, 6, 5, 4, 3, 2, 1])  # already ranked: id i is i-th
    positive = np.zeros(10, dtype=bool)
    positive[[0, 3, 9]] = True
    assert recall_at(score, positive, 10) == pytest.approx(1 / 3)  # top 1: {0}
    assert recall_at(score, positive, 30) == pytest.approx(1 / 3)  # top 3: {0, 1, 2}
    assert recall_at(score, positive, 40) == pytest.approx(2 / 3)  # top 4 adds 3
    assert recall_at(score, positive, 100) == 1.0
    assert recall_at(score[::-1], positive, 20) == pytest.approx(1 / 3)  # reversed: top 2 = {9, 8}
    tied = np.array([1.0, 1.0, 0.0])
    assert recall_at(tied, np.array([False, True, False]), 34) == 1.0  # top 2 of 3, stable ties
    assert recall_at(tied, np.array([False, True, False]), 33) == 0.0  # top 1: id 0 (index order)


def test_top_count_is_the_ceiling_of_the_share() -> None:
    assert top_count(2000, 10) == 200 and top_count(2000, 1) == 20
    assert top_count(7, 10) == 1 and top_count(15, 10) == 2 and top_count(3, 0.01) == 1


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory: pytest.TempPathFactory) -> engine.Run:
    return engine.build("digits", "logreg", tmp_path_factory.mktemp("runs") / "noisy", label_noise=0.2,
                        train_size=300, test_size=50, ihvp="exact", weight_decay=1e-2, progress=False)


def test_every_score_finds_the_flipped_labels_of_a_convex_run(noisy_run: engine.Run) -> None:
    report = mislabel_check(noisy_run)
    assert report["n_train"] == 300 and report["n_flipped"] == 60 and report["label_noise"] == 0.2
    assert report["ihvp"] == "exact"
    rows = {r["score"]: r for r in report["scores"]}
    assert list(rows) == [s.value for s in MislabelScore]
    positive = np.isin(np.arange(300), noisy_run.dataset.flipped)
    # the ranking is |self-influence| (its raw value is ≤ 0 and would rank the flips last)
    expected = roc_auc_score(positive, np.abs(noisy_run.self_influence()))
    assert rows["self_influence"]["auc"] == pytest.approx(expected, abs=1e-12)
    assert rows["loss"]["auc"] == pytest.approx(roc_auc_score(positive, noisy_run.train_losses()), abs=1e-12)
    for row in rows.values():  # measured: 0.99 for every score
        assert row["auc"] > 0.9, row
        assert list(row["recall"]) == ["1", "5", "10", "20"]
        assert row["recall"]["20"] > 0.8  # 60 flips in the top 60: a perfect ranking gives 1
        assert row["recall"]["5"] == pytest.approx(0.25)  # top 15 are all flips: 15 / 60
    saved = load_mislabel(noisy_run.path)
    assert saved is not None and saved["scores"][0]["auc"] == rows["self_influence"]["auc"]
    assert (noisy_run.path / MISLABEL_FILE).is_file()


def test_the_callback_follows_each_score_and_a_raise_stops_the_check(noisy_run: engine.Run) -> None:
    calls: list[tuple[int, int]] = []
    mislabel_check(noisy_run, save=False, callback=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]

    class Stop(Exception):
        pass

    def stop_after_one(done: int, total: int) -> None:
        if done == 1:
            raise Stop  # a cancelled job's report raises like this

    saved = (noisy_run.path / MISLABEL_FILE).read_bytes() if (noisy_run.path / MISLABEL_FILE).is_file() else None
    with pytest.raises(Stop):
        mislabel_check(noisy_run, callback=stop_after_one)
    after = (noisy_run.path / MISLABEL_FILE).read_bytes() if (noisy_run.path / MISLABEL_FILE).is_file() else None
    assert after == saved  # nothing written


def test_a_run_without_flips_is_refused_with_the_fix(blobs_run: engine.Run) -> None:
    with pytest.raises(InfluenceError, match="--label-noise"):
        mislabel_check(blobs_run, save=False)
    assert load_mislabel(blobs_run) is None
