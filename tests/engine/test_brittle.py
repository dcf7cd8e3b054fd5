"""Brittleness: the smallest k of most helpful training points whose removal flips a prediction,
checked against an independent float64 Newton retraining of the same objective."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.brittle import BRITTLE_FILE, brittleness, load_brittleness, search_steps
from engine.errors import QueryError
from tests.small_data import write_blobs

LAM = 1e-2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> engine.Run:
    data = write_blobs(tmp_path_factory.mktemp("data") / "blobs.npz")
    return engine.build(str(data), "logreg", tmp_path_factory.mktemp("runs") / "brittle",
                        weight_decay=LAM, ihvp="exact", progress=False)


def _objective(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, c: int) -> torch.Tensor:
    """Mean softmax cross-entropy of the linear model [W (c, d) row-major, b (c)] + (λ/2)‖θ‖²."""
    d = x.shape[1]
    logits = x @ theta[: c * d].reshape(c, d).T + theta[c * d :]  # (m, c)
    return torch.nn.functional.cross_entropy(logits, y) + LAM / 2 * theta @ theta


def _newton(x: torch.Tensor, y: torch.Tensor, c: int) -> torch.Tensor:
    """The optimum by damped Newton with backtracking, float64, to ‖∇‖ < 1e-12."""
    theta = torch.zeros(c * x.shape[1] + c, dtype=torch.float64)
    for _ in range(100):
        g = torch.func.grad(_objective)(theta, x, y, c)
        if float(g.norm()) < 1e-12:
            return theta
        step = torch.linalg.solve(torch.func.hessian(_objective)(theta, x, y, c), g)
        t, f0 = 1.0, float(_objective(theta, x, y, c))
        while float(_objective(theta - t * step, x, y, c)) > f0 - 0.25 * t * float(g @ step) and t > 1e-8:
            t /= 2
        theta = theta - t * step
    raise AssertionError("Newton did not converge")


def _predicted_without(run: engine.Run, removed: np.ndarray, test_id: int) -> int:
    ds = run.dataset
    keep = np.setdiff1d(np.arange(ds.n_train), removed)
    x = torch.from_numpy(np.asarray(ds.x_train, dtype=np.float64).reshape(ds.n_train, -1)[keep])
    theta = _newton(x, torch.from_numpy(np.asarray(ds.y_train)[keep]).long(), ds.n_classes)
    xt = torch.from_numpy(np.asarray(ds.x_test, dtype=np.float64).reshape(ds.n_test, -1)[test_id : test_id + 1])
    d = xt.shape[1]
    return int((xt @ theta[: ds.n_classes * d].reshape(ds.n_classes, d).T + theta[ds.n_classes * d :]).argmax())


def _closest_calls(run: engine.Run, count: int) -> list[int]:
    """The correctly predicted test points with the smallest margin between the two top classes."""
    p = run.predictions("test")  # (m, c)
    top2 = np.sort(p, axis=1)[:, -2:]
    correct = np.flatnonzero(p.argmax(axis=1) == run.dataset.y_test)
    return correct[np.argsort(top2[correct, 1] - top2[correct, 0])][:count].tolist()


def test_the_reference_newton_is_the_runs_objective(run: engine.Run) -> None:
    ds = run.dataset
    x = torch.from_numpy(np.asarray(ds.x_train, dtype=np.float64).reshape(ds.n_train, -1))
    theta = _newton(x, torch.from_numpy(np.asarray(ds.y_train)).long(), ds.n_classes)
    assert torch.allclose(theta, run.model.theta.cpu().double(), atol=1e-7)


def test_the_k_found_is_the_smallest_that_flips_under_independent_retraining(run: engine.Run) -> None:
    tests = _closest_calls(run, 3)
    seen: list[tuple[int, int]] = []
    report = brittleness(run, test_index=tests, max_k=40, callback=lambda d, t: seen.append((d, t)))
    scores = run.scores(tests)  # (n, 3)
    searched = 0
    for j, row in enumerate(report["results"]):
        assert row["test_id"] == tests[j] and row["predicted"] == row["label"]
        k, tried = row["k"], {t["k"]: t["flipped"] for t in row["tried"]}
        assert k is not None and tried[k] and (k == 1 or tried[k - 1] is False)
        searched = max(searched, len(row["tried"]))
        helpful = np.argsort(scores[:, j], kind="stable")  # most negative first
        assert np.all(scores[helpful[:k], j] < 0)
        assert _predicted_without(run, helpful[:k], tests[j]) != row["predicted"]
        if k > 1:
            assert _predicted_without(run, helpful[: k - 1], tests[j]) == row["predicted"]
        assert "exact optimum" in row["ground_truth"] and row["control_flipped"] is None
    assert searched >= 5  # one search bisected after doubling (measured k = 2, 2, 14)
    done = sum(len(r["tried"]) for r in report["results"])
    assert seen[-1] == (done, done) and [d for d, _ in seen[:done]] == list(range(1, done + 1))
    assert all(t >= d for d, t in seen)
    saved = load_brittleness(run.path)
    assert saved is not None and saved["results"][2]["k"] == report["results"][2]["k"]
    assert (run.path / BRITTLE_FILE).is_file() and report["ihvp"] == "exact"


def test_no_k_up_to_max_k_flips_gives_none(run: engine.Run) -> None:
    test = _closest_calls(run, 3)[2]  # needs k = 14 (previous test)
    row = brittleness(run, test_index=test, max_k=4, save=False)["results"][0]
    assert row["k"] is None and row["max_k"] == 4
    assert [t["k"] for t in row["tried"]] == [1, 2, 4] and not any(t["flipped"] for t in row["tried"])


def test_default_tests_are_correct_predictions_and_bad_max_k_is_refused(run: engine.Run) -> None:
    with pytest.raises(QueryError, match="max_k"):
        brittleness(run, max_k=0, save=False)
    row = brittleness(run, tests=1, max_k=1, seed=3, save=False)["results"][0]
    assert row["predicted"] == row["label"] and len(row["tried"]) == 1


@pytest.mark.parametrize("max_k", [1, 2, 3, 5, 8, 15, 40, 100])
def test_search_steps_bounds_every_search(max_k: int) -> None:
    from engine.brittle import _search

    for flip_at in [*range(1, max_k + 1), max_k + 1]:
        k, tried = _search(lambda kk, f=flip_at: int(kk >= f), max_k=max_k, before=0)
        assert k == (flip_at if flip_at <= max_k else None)
        assert len(tried) <= search_steps(max_k)


def test_a_network_records_its_control_retraining(tmp_path: Path) -> None:
    data = write_blobs(tmp_path / "blobs.npz", n_train=60, n_test=10)
    net = engine.build(str(data), "mlp", tmp_path / "mlp", weight_decay=LAM, ihvp="exact", progress=False)
    report = brittleness(net, tests=2, max_k=2, lbfgs_steps=20, save=False)
    for row in report["results"]:
        assert isinstance(row["control_flipped"], bool) and "L-BFGS" in row["ground_truth"]
        assert 1 <= len(row["tried"]) <= search_steps(2) and row["max_k"] <= 2


def test_a_search_with_no_helpful_point_tries_nothing() -> None:
    from engine.brittle import _search

    assert _search(lambda k: 1 / 0, max_k=0, before=0) == (None, []) and search_steps(0) == 0


def test_load_brittleness_of_an_unchecked_folder_is_none(tmp_path: Path) -> None:
    assert load_brittleness(tmp_path) is None
