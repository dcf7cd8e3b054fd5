"""The trust check: do this run's influence scores predict what retraining actually does?

Basu, Pope & Feizi (2021) show influence estimates are fragile in deep networks, so every run
can be checked and the result shown next to its scores. For a few test points, the training
points of largest |influence| (Koh & Liang's choice) are removed one at a time and the model is
retrained (:func:`engine.validate.leave_one_out`: the exact optimum for convex models,
warm-started full-batch L-BFGS for networks). The actual test-loss changes are compared with
the predicted ``−I_up,loss/n`` of every IHVP method and damping asked for (Pearson and
Spearman). The *noise floor* is the change the same retraining makes when nothing is removed:
if it is not far below the actual changes, the check measures the optimiser, not influence.

The report is saved as ``trust.json`` in the run folder and read back by :func:`load_trust`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import IHVPMethod
from .errors import InfluenceError
from .run import Run
from .store.files import load_run_report, save_json
from .validate import group_removal, leave_one_out, pearson, spearman

__all__ = ["TRUST_FILE", "load_trust", "trust_check"]

TRUST_FILE = "trust.json"


def _methods(run: Run, methods: Sequence[str] | None) -> list[str]:
    if methods is not None:
        return list(methods)
    if run.store.projected:
        return [m.value for m in run.solvers.available()]
    return [m.value for m in (IHVPMethod.EXACT, IHVPMethod.CG, IHVPMethod.LISSA)]


def trust_check(run: Run, *, test_index: Sequence[int] | None = None, n_tests: int = 4, top: int = 5,
                methods: Sequence[str] | None = None, dampings: Sequence[float] | None = None,
                seed: int = 0, lbfgs_steps: int = 300, save: bool = True,
                progress: bool = False) -> dict[str, Any]:
    """Predicted against actual leave-one-out loss changes, per IHVP method and damping.

    ``test_index`` (default: ``n_tests`` test points drawn with ``seed``) are the test points;
    for each, its ``top`` training points of largest |influence| under the run's own method are
    removed one at a time. ``dampings`` default to the run's δ alone. Returns (and with
    ``save`` writes to ``trust.json``) the ground truth used, the noise floor, and one row per
    (method, damping) with Pearson, Spearman and the seconds its scores took.
    """
    t0 = time.perf_counter()
    if test_index is None:
        rng = np.random.default_rng(seed)
        test_index = sorted(rng.choice(run.n_test, size=min(n_tests, run.n_test), replace=False).tolist())
    tests = [int(t) for t in test_index]
    loo = leave_one_out(run, test_index=tests, top=top, lbfgs_steps=lbfgs_steps, progress=progress)
    actual = np.asarray(loo["actual"])
    pairs = loo["pairs"]
    removed = np.array([i for i, _ in pairs])
    cols = np.array([tests.index(j) for _, j in pairs])
    floor = np.abs(group_removal(run, [], tests, lbfgs_steps=lbfgs_steps)["actual"])  # nothing removed
    rows = []
    for method in _methods(run, methods):
        for damping in (dampings if dampings is not None else [run.config.damping]):
            t = time.perf_counter()
            try:
                scores = run.scores(tests, ihvp=method, damping=float(damping))  # (n, m)
            except InfluenceError as exc:  # e.g. a singular H at this damping: reported, not fatal
                rows.append({"method": method, "damping": float(damping), "error": str(exc)})
                continue
            predicted = -scores[removed, cols] / run.n_train
            rows.append({"method": method, "damping": float(damping),
                         "pearson": pearson(predicted, actual), "spearman": spearman(predicted, actual),
                         "seconds": time.perf_counter() - t})
    report = {
        "model": run.info.model.kind.value,
        "ground_truth": loo["ground_truth"],
        "test_ids": tests,
        "pairs": [[int(i), int(j)] for i, j in pairs],
        "actual": actual.tolist(),
        "mean_abs_actual": float(np.abs(actual).mean()),
        "noise_floor": float(floor.mean()),
        "weight_decay": run.config.weight_decay,
        "results": rows,
        "seconds": time.perf_counter() - t0,
    }
    if save:
        save_json(run.path / TRUST_FILE, report)
    return report


def load_trust(run: Run | Path) -> dict[str, Any] | None:
    """The saved trust report of a run (or run folder), or None when it has not been checked."""
    return load_run_report(run, TRUST_FILE)
