"""Brittleness: how many of its most helpful training points must go before a prediction flips?

Following Broderick, Giordano & Meager (2020) and Ilyas et al. (2022, "datamodels"): for a test
point z_t, order the training points by ``I_up,loss(z_i, z_t)``, most negative (most helpful)
first; remove the k most helpful, retrain (:func:`engine.validate.retrain_without`: the exact
optimum for convex models, warm-started full-batch L-BFGS for networks) and ask whether the
predicted class of z_t changes. The report gives the smallest such k: a small k means the
prediction rests on a handful of training points.

Search: k = 1, 2, 4, … (doubling, then ``max_k`` itself) until the prediction flips, then a
binary search between the largest unflipped and the smallest flipped k. The binary search
assumes that flipping is monotone in k (removing more helpful points never restores the
prediction); it is not guaranteed, so every k tried is recorded with its outcome, and the k
reported always flips while k−1 was tried and did not (k = 1: the prediction before removal).
Only strictly helpful points (negative scores) are removed: ``max_k`` is capped by their number.

For networks θ̂ is not an exact optimum, so retraining with *nothing* removed can already move
a prediction; one such control retraining is run and each result says whether it flipped that
prediction (``control_flipped``; None for convex models, whose retraining returns θ̂ itself).
A k reported for a point whose control flipped measures the optimiser, not the data.

The report is saved as ``brittleness.json`` in the run folder and read back by
:func:`load_brittleness`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ModelKind
from .errors import QueryError
from .query.scoring import check_indices
from .run import Run
from .store.files import load_run_report, save_json
from .validate import newton_solver, retrain_without

__all__ = ["BRITTLE_FILE", "brittleness", "default_max_k", "load_brittleness", "search_steps"]

BRITTLE_FILE = "brittleness.json"
MAX_K_CAP = 1000


def default_max_k(n_train: int) -> int:
    """The largest k searched by default: a tenth of the training set, at most 1,000."""
    return max(1, min(n_train // 10, MAX_K_CAP))


def search_steps(max_k: int) -> int:
    """An upper bound on the retrainings one search up to ``max_k`` takes (for progress)."""
    doubling = max_k.bit_length() + (max_k & (max_k - 1) != 0)  # 1, 2, 4, …, and max_k itself
    return doubling + max(0, (max_k // 2).bit_length())


def _ground_truth(run: Run) -> str:
    if run.info.model.kind is ModelKind.SVM:
        return "retraining of the hinge SVM to its optimum (liblinear) without the removed points"
    if run.info.model.convex:
        return "retraining to the exact optimum (warm-started, Newton) without the removed points"
    return "warm-started full-batch L-BFGS retraining from θ̂ without the removed points"


def _search(flips: Callable[[int], int], *, max_k: int, before: int
            ) -> tuple[int | None, list[dict[str, Any]]]:
    """The smallest k ≤ max_k with ``flips(k) != before`` by doubling then bisection, and every
    (k, predicted, flipped) tried in order. ``flips(k)``: the predicted class after removing k."""
    tried: list[dict[str, Any]] = []

    def probe(k: int) -> bool:
        predicted = flips(k)
        tried.append({"k": k, "predicted": predicted, "flipped": predicted != before})
        return predicted != before

    lo, hi, k = 0, None, 1  # lo: the largest k known unflipped; hi: the smallest known flipped
    while max_k >= 1:
        if probe(k):
            hi = k
            break
        lo = k
        if k == max_k:
            break
        k = min(2 * k, max_k)
    if hi is None:
        return None, tried
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            hi = mid
        else:
            lo = mid
    return hi, tried


def _control(run: Run, ids: list[int], *, newton: Any, lbfgs_steps: int) -> np.ndarray:
    """Predicted classes (m,) of the test points ``ids`` after retraining with nothing removed."""
    theta = run.model.theta
    new = retrain_without(run, torch.ones(run.n_train, dtype=torch.bool), newton=newton,
                          lbfgs_steps=lbfgs_steps)
    with torch.no_grad():
        out = run.model.objective.logits(new, run.data.x_test[torch.as_tensor(ids)]).argmax(dim=1)  # (m,)
    run.model.objective.load_flat(theta)
    return out.cpu().numpy()


def _draw_tests(run: Run, *, tests: int, seed: int) -> list[int]:
    correct = np.flatnonzero(run.predictions("test").argmax(axis=1) == run.dataset.y_test)  # (m,)
    if correct.size == 0:
        raise QueryError("no test point is predicted correctly: pass --test-index")
    rng = np.random.default_rng(seed)
    return sorted(int(t) for t in rng.choice(correct, size=min(tests, correct.size), replace=False))


class _Ticker:
    """Progress over the searches: a tqdm bar and ``callback(done, total)`` after each retraining,
    ``total`` the retrainings done plus an upper bound on those left."""

    def __init__(self, bounds: list[int], *, progress: bool,
                 callback: Callable[[int, int], None] | None) -> None:
        self.bounds, self.callback = list(bounds), callback
        self.done, self.here = 0, 0
        self.bar = tqdm(total=sum(bounds), desc="brittleness", disable=not progress, file=sys.stderr)

    def step(self, j: int) -> None:
        self.done += 1
        self.here += 1
        self.bar.update(1)
        if self.callback is not None:
            left = max(0, self.bounds[j] - self.here) + sum(self.bounds[j + 1 :])
            self.callback(self.done, self.done + left)

    def finish(self, j: int) -> None:
        """Search ``j`` ended: its bound becomes the retrainings it took."""
        self.bounds[j], self.here = self.here, 0
        self.bar.total = sum(self.bounds)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        if self.callback is not None:
            self.callback(self.done, self.done)


def brittleness(run: Run, *, test_index: int | Sequence[int] | None = None, tests: int = 5,
                max_k: int | None = None, ihvp: str | None = None, seed: int = 0,
                lbfgs_steps: int = 300, save: bool = True, progress: bool = False,
                callback: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The smallest number k of most-helpful training points whose removal flips each prediction.

    ``test_index`` names the test points (default: ``tests`` correctly predicted ones drawn
    with ``seed``). For each, the training points are ordered by ``I_up,loss(z_i, z_t)``
    (``ihvp``: the run's method unless given), most negative first, and k is searched up to
    ``max_k`` (default :func:`default_max_k`, capped per point by its number of helpful points).
    ``callback(done, total)`` is called after every retraining; ``total`` is an upper bound
    that tightens as searches end early. Returns (and with ``save`` writes to
    ``brittleness.json``) ``{"results": [{"test_id", "label", "predicted", "k", "max_k",
    "tried": [{"k", "predicted", "flipped"}], "ground_truth", "control_flipped"}], "ihvp",
    "seconds", "created"}``, ``k`` None when no k ≤ max_k flips the prediction.
    """
    t0 = time.perf_counter()
    if max_k is not None and max_k < 1:
        raise QueryError(f"max_k must be at least 1, got {max_k}")
    ids = (_draw_tests(run, tests=tests, seed=seed) if test_index is None
           else [int(t) for t in check_indices(test_index, run.n_test, "test")])
    scores = run.scores(ids, ihvp=ihvp)  # (n, m)
    obj, theta = run.model.objective, run.model.theta
    newton = newton_solver(run)
    ground_truth = _ground_truth(run)
    cap = default_max_k(run.n_train) if max_k is None else int(max_k)
    caps = [min(cap, int((scores[:, j] < 0).sum())) for j in range(len(ids))]  # 0: nothing helps
    bounds = [search_steps(c) for c in caps]
    control = None if run.info.model.convex else _control(run, ids, newton=newton, lbfgs_steps=lbfgs_steps)
    ticker = _Ticker(bounds, progress=progress, callback=callback)
    results = []
    for j, t in enumerate(ids):
        xt = run.data.x_test[t : t + 1]  # (1, *input_shape)
        with torch.no_grad():
            before = int(obj.logits(theta, xt).argmax(dim=1)[0])
        order = np.argsort(scores[:, j], kind="stable")  # (n,) most helpful first

        def predicted_without(k: int, order: np.ndarray = order, xt: torch.Tensor = xt, j: int = j) -> int:
            keep = torch.ones(run.n_train, dtype=torch.bool)  # (n,)
            keep[torch.from_numpy(order[:k].copy())] = False
            new = retrain_without(run, keep, newton=newton, lbfgs_steps=lbfgs_steps)
            with torch.no_grad():
                out = int(obj.logits(new, xt).argmax(dim=1)[0])
            obj.load_flat(theta)
            ticker.step(j)
            return out

        k, tried = _search(predicted_without, max_k=caps[j], before=before)
        ticker.finish(j)
        results.append({"test_id": t, "label": int(run.dataset.y_test[t]), "predicted": before,
                        "k": k, "max_k": caps[j], "tried": tried, "ground_truth": ground_truth,
                        "control_flipped": None if control is None else bool(control[j] != before)})
    ticker.close()
    report = {
        "results": results,
        "ihvp": run.solver(ihvp).method.value,
        "seconds": time.perf_counter() - t0,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if save:
        save_json(run.path / BRITTLE_FILE, report)
    return report


def load_brittleness(run_or_path: Run | str | Path) -> dict[str, Any] | None:
    """The saved brittleness report of a run (or run folder), or None when it has not been run."""
    return load_run_report(run_or_path, BRITTLE_FILE)
