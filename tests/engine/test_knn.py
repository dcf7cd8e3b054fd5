"""FastIF: the kNN index against references, candidate scores against the full scan, recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.models.objective import Objective
from engine.query import knn
from engine.query.knn import (
    KNNIndex,
    fastif_candidates,
    fastif_top_influences,
    gradient_norm_order,
    penultimate_features,
    run_index,
    train_features,
)


def _naive_knn(rows: np.ndarray, q: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Reference: float64 distances to every row, full stable argsort."""
    r, qq = rows.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        r = r / np.linalg.norm(r, axis=1, keepdims=True)
        qq = qq / np.linalg.norm(qq, axis=1, keepdims=True)
        d = 1.0 - qq @ r.T
    else:
        d = ((qq[:, None, :] - r[None, :, :]) ** 2).sum(-1)  # (m, n)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


@pytest.fixture
def points() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.normal(size=(700, 12)).astype(np.float32), rng.normal(size=(9, 12)).astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_torch_brute_force_matches_naive(points, metric, monkeypatch):
    rows, q = points
    monkeypatch.setattr(knn, "SEARCH_BLOCK", 128)  # several blocks: exercises the running merge
    dist, ids = KNNIndex(rows, metric=metric, backend="torch").search(q, 15)
    np.testing.assert_array_equal(ids, _naive_knn(rows, q, 15, metric))
    assert dist.shape == (9, 15) and np.all(np.diff(dist, axis=1) >= -1e-5)  # nearest first


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_faiss_matches_brute_force(points, metric):
    pytest.importorskip("faiss")
    rows, q = points
    fd, fi = KNNIndex(rows, metric=metric, backend="faiss").search(q, 15)
    td, ti = KNNIndex(rows, metric=metric, backend="torch").search(q, 15)
    np.testing.assert_array_equal(fi, ti)
    np.testing.assert_allclose(fd, td, rtol=1e-4, atol=1e-4)


def test_index_errors(points):
    rows, q = points
    index = KNNIndex(rows, backend="torch")
    with pytest.raises(engine.QueryError, match="dimension"):
        index.search(q[:, :5], 3)
    with pytest.raises(engine.QueryError, match="metric"):
        KNNIndex(rows, metric="manhattan")
    assert index.search(q, 10_000)[1].shape == (9, 700)  # k is capped at n


def test_penultimate_features_are_the_last_linear_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    obj = Objective(model, nn.functional.cross_entropy, device=torch.device("cpu"), dtype=torch.float64)
    theta = obj.flat_params()
    x = torch.randn(10, 2, 3, dtype=torch.float64)
    want = torch.tanh(model[1](x.flatten(1)))  # (10, 4)
    torch.testing.assert_close(penultimate_features(obj, theta, x, batch=3), want, rtol=1e-12, atol=1e-14)
    assert not model[3]._forward_hooks  # the hook is removed


def test_logreg_features_are_the_input(blobs_run):
    np.testing.assert_array_equal(train_features(blobs_run, "features"),
                                  blobs_run.data.x_train.numpy().astype(np.float32))
    assert run_index(blobs_run) is run_index(blobs_run)  # built once per run


@pytest.mark.parametrize("space", ["features", "gradients"])
def test_candidate_scores_equal_full_scan(blobs_run, space):
    idx = [0, 3, 17]
    found = fastif_candidates(blobs_run, idx, candidates=40, space=space)
    full = blobs_run.scores(idx)  # (n_train, 3) float64
    for j, (ids, scores) in enumerate(found):
        assert ids.shape == scores.shape == (40,) and scores.dtype == np.float64
        assert len(set(ids)) == 40
        want = full[ids, j]
        np.testing.assert_allclose(scores, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())


def test_pool_adds_the_largest_gradient_norms(blobs_run):
    norms = np.linalg.norm(blobs_run.store.resident.data.numpy(), axis=1)
    pool = np.argsort(-norms)[:25]
    np.testing.assert_array_equal(gradient_norm_order(blobs_run)[:25], pool)
    idx = [4, 9]
    near = fastif_candidates(blobs_run, idx, candidates=30)
    found = fastif_candidates(blobs_run, idx, candidates=30, pool=25)
    full = blobs_run.scores(idx)
    for j, ((ids, scores), (near_ids, _)) in enumerate(zip(found, near)):
        np.testing.assert_array_equal(ids[:30], near_ids)  # the neighbours first, nearest first
        assert set(ids) == set(near_ids) | set(pool) and len(ids) == len(set(ids))
        want = full[ids, j]
        np.testing.assert_allclose(scores, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    got = fastif_top_influences(blobs_run, idx, top=10, candidates=30, pool=25)
    assert [r["candidates"] for r in got] == [len(ids) for ids, _ in found]


def test_all_candidates_is_the_full_scan(blobs_run):
    for i in (0, 5, 11):
        got = fastif_top_influences(blobs_run, i, top=10, candidates=blobs_run.n_train)[0]
        want = blobs_run.explain(i, top=10)
        assert got["candidates"] == blobs_run.n_train and got["test_id"] == i
        for side in ("helpful", "harmful"):
            assert [r["train_id"] for r in got[side]] == [r["train_id"] for r in want[side]]
            assert [r["label"] for r in got[side]] == [r["label"] for r in want[side]]
            np.testing.assert_allclose([r["score"] for r in got[side]],
                                       [r["score"] for r in want[side]], rtol=1e-10)
        assert got["helpful"][0]["score"] < 0 < got["harmful"][0]["score"]


def test_query_errors(blobs_run):
    with pytest.raises(engine.QueryError, match="at least top"):
        fastif_top_influences(blobs_run, 0, top=10, candidates=5)
    with pytest.raises(engine.QueryError, match="space"):
        fastif_top_influences(blobs_run, 0, space="pixels")
    with pytest.raises(engine.QueryError, match="pool"):
        fastif_top_influences(blobs_run, 0, pool=-1)
    with pytest.raises(engine.IndexOutOfRange):
        fastif_top_influences(blobs_run, blobs_run.n_test)


def _recall(full: list[dict], fast: list[dict], side: str) -> float:
    hits = [len({r["train_id"] for r in f[side]} & {r["train_id"] for r in q[side]}) / len(f[side])
            for f, q in zip(full, fast)]
    return float(np.mean(hits))


def test_digits_recall_at_10(digits_run):
    """Measured on the 1,297-point digits logreg run, tests 0..39, 200 candidates (input space):
    helpful 0.98, harmful 0.66; with a 100-point gradient-norm pool: 0.99, 0.86. Floors sit below."""
    tests = list(range(40))
    full = [digits_run.explain(i, top=10) for i in tests]
    fast = fastif_top_influences(digits_run, tests, top=10, candidates=200)
    helpful, harmful = _recall(full, fast, "helpful"), _recall(full, fast, "harmful")
    assert helpful >= 0.9
    assert (helpful + harmful) / 2 >= 0.7
    pooled = fastif_top_influences(digits_run, tests, top=10, candidates=200, pool=100)
    assert _recall(full, pooled, "helpful") >= helpful
    assert _recall(full, pooled, "harmful") >= 0.75
