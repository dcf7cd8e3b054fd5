"""Checking predicted influence against actual leave-one-out retraining.

For each chosen training point z_i the model is retrained on the objective without it,
``(1/(n−1)) Σ_{j≠i} L(z_j, θ) + (λ/2)‖θ‖²``, warm-started from θ̂ (convex models: L-BFGS then
Newton to ‖∇‖ < 1e-10, so warm and cold starts reach the same optimum; networks: full-batch
L-BFGS from θ̂, the "warm-started" ground truth, which does not measure seed noise). The actual
change of each test loss is compared with the prediction ``−I_up,loss(z_i, z_test)/n``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ModelKind, TrainConfig
from .models.objective import Objective
from .models.svm import to_flat as svm_to_flat
from .models.svm import train_hinge_svm
from .models.train import lbfgs, objective_value_and_grad, train_convex
from .run import Run

__all__ = [
    "group_removal",
    "lds",
    "leave_one_out",
    "newton_solver",
    "pearson",
    "retrain_convex",
    "retrain_without",
    "spearman",
]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(np.ravel(a)))
    rb = np.argsort(np.argsort(np.ravel(b)))
    return pearson(ra.astype(float), rb.astype(float))


def _test_losses(obj: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        logits = obj.logits(theta, x)
        return np.array([float(obj.loss_fn(logits[j : j + 1], y[j : j + 1])) for j in range(len(y))])


def retrain_convex(obj: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                   lam: float, newton: Any, config: TrainConfig | None = None) -> torch.Tensor:
    """The exact optimum without the removed point: chord iterations ``θ ← θ − H(θ̂)⁻¹∇R(θ)``
    with the run's own Hessian (the fixed point is the optimum; the contraction is fast because
    one point moves θ little), falling back to full Newton steps if they stall."""
    config = config or TrainConfig()
    if newton is not None:
        th = theta.clone()
        for _ in range(60):
            _, g = objective_value_and_grad(obj, th, x, y, weight_decay=lam)
            if float(g.norm()) < config.grad_tol:
                return th
            th = th - newton.solve(g)
    obj.load_flat(theta)
    return train_convex(obj, x, y, weight_decay=lam, warm=True, config=config).theta


def _is_convex(run: Run) -> bool:
    return run.info.model.convex


def newton_solver(run: Run) -> Any:
    """The run's exact solver, used for chord iterations, where the model is convex and either
    small or already built with the exact Hessian (each chord step is then one solve; above
    ``newton_max_params`` L-BFGS from θ̂ took ~100 s per retraining on Fashion-MNIST logreg,
    p = 7,850). Else None: :func:`retrain_convex` trains with L-BFGS and, for small p, Newton."""
    if not _is_convex(run) or run.store.projected:
        return None
    small = run.model.n_params <= run.config.train.newton_max_params
    return run.solver("exact") if small or run.default_method.value == "exact" else None


def _ground_truth(run: Run, what: str) -> str:
    if run.info.model.kind is ModelKind.SVM:
        return f"{what} retraining of the hinge SVM to its optimum (liblinear)"
    return (f"{what} retraining to the exact optimum (warm-started, Newton)" if _is_convex(run)
            else f"warm-started {what} retraining (full-batch L-BFGS)")


def retrain_without(run: Run, keep: torch.Tensor, *, newton: Any, lbfgs_steps: int) -> torch.Tensor:
    """θ retrained on the training points where ``keep`` is true, on the mean objective
    ``(1/|kept|) Σ L + (λ/2)‖θ‖²``, warm-started from θ̂. Leaves ``run.model.objective`` loaded with θ̂."""
    obj, theta = run.model.objective, run.model.theta
    x_train, y_train = run.data.x_train, run.data.y_train
    x, y = x_train[keep.to(x_train.device)], y_train[keep.to(y_train.device)]
    obj.load_flat(theta)
    lam = run.config.weight_decay
    if run.info.model.kind is ModelKind.SVM:  # the hinge SVM, as build trains it
        xs, ys = x.cpu().double().numpy(), y.cpu().numpy()
        rows = train_hinge_svm(xs, ys, n_classes=run.dataset.n_classes, weight_decay=lam,
                               seed=run.config.seed)
        new = torch.from_numpy(svm_to_flat(rows)).to(theta.device, theta.dtype)
    elif _is_convex(run):
        new = retrain_convex(obj, theta, x, y, lam=lam, newton=newton, config=run.config.train)
    else:
        new, _ = lbfgs(obj, theta, x, y, weight_decay=lam, steps=lbfgs_steps)
    obj.load_flat(theta)
    return new


def group_removal(run: Run, train_ids: Sequence[int], test_index: Sequence[int], *,
                  lbfgs_steps: int = 300) -> dict[str, Any]:
    """Actual change of each chosen test loss when the whole group ``train_ids`` is removed and
    the model retrained (the ground truth for :func:`engine.group.group_influence`)."""
    t0 = time.perf_counter()
    tests = np.asarray(test_index, dtype=np.int64)
    group = np.unique(np.asarray(train_ids, dtype=np.int64))
    xt, yt = run.data.x_test[torch.as_tensor(tests)], run.data.y_test[torch.as_tensor(tests)]
    base = _test_losses(run.model.objective, run.model.theta, xt, yt)
    keep = torch.ones(run.n_train, dtype=torch.bool)
    keep[torch.as_tensor(group)] = False
    new = retrain_without(run, keep, newton=newton_solver(run), lbfgs_steps=lbfgs_steps)
    return {"actual": _test_losses(run.model.objective, new, xt, yt) - base,
            "ground_truth": _ground_truth(run, "group-removal"),
            "seconds": time.perf_counter() - t0}


def leave_one_out(run: Run, *, test_index: Sequence[int], train_index: Sequence[int] | None = None,
                  top: int = 10, ihvp: str | None = None, lbfgs_steps: int = 300,
                  progress: bool = False) -> dict[str, Any]:
    """Predicted vs actual test-loss changes when single training points are removed.

    ``train_index`` names the points to remove; by default, for each test point its ``top``
    training points of largest |influence| (Koh & Liang's choice). Returns arrays ``predicted``
    and ``actual`` of shape (n_pairs,) with ``pairs`` (train_id, test_id), Pearson and Spearman
    correlations, and the ground truth used.
    """
    t0 = time.perf_counter()
    tests = np.asarray(test_index, dtype=np.int64)
    scores = run.scores(tests, ihvp=ihvp)  # (n, m)
    n = run.n_train
    if train_index is None:
        removals = sorted({int(i) for j in range(len(tests))
                           for i in np.argsort(-np.abs(scores[:, j]))[:top]})
    else:
        removals = [int(i) for i in train_index]
    obj, theta = run.model.objective, run.model.theta
    xt, yt = run.data.x_test[torch.as_tensor(tests)], run.data.y_test[torch.as_tensor(tests)]
    base = _test_losses(obj, theta, xt, yt)
    keep = torch.ones(n, dtype=torch.bool)
    newton = newton_solver(run)
    actual = np.empty((len(removals), len(tests)))
    for r, i in enumerate(tqdm(removals, desc="retrain", disable=not progress, file=sys.stderr)):
        keep[:] = True
        keep[i] = False
        new = retrain_without(run, keep, newton=newton, lbfgs_steps=lbfgs_steps)
        actual[r] = _test_losses(obj, new, xt, yt) - base
    obj.load_flat(theta)
    predicted = -scores[removals] / n  # (k, m)
    mask = np.ones_like(actual, dtype=bool)
    if train_index is None:  # only the pairs that selected each removal
        mask[:] = False
        for j in range(len(tests)):
            for i in np.argsort(-np.abs(scores[:, j]))[:top]:
                mask[removals.index(int(i)), j] = True
    pairs = [(removals[r], int(tests[j])) for r, j in zip(*np.nonzero(mask))]
    p, a = predicted[mask], actual[mask]
    return {
        "pairs": pairs,
        "predicted": p,
        "actual": a,
        "pearson": pearson(p, a),
        "spearman": spearman(p, a),
        "ground_truth": _ground_truth(run, "leave-one-out"),
        "ihvp": ihvp or run.default_method.value,
        "seconds": time.perf_counter() - t0,
    }


def lds(run: Run, **options: Any) -> dict[str, Any]:
    """The linear datamodeling score of ``run``'s influence scores: :func:`engine.lds.lds`
    (the same keyword options), kept here beside the other retraining checks."""
    from .lds import lds as linear_datamodeling_score  # engine.lds imports this module's helpers

    return linear_datamodeling_score(run, **options)
