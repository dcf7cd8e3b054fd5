"""Group influence: the effect of removing a set U of training points on chosen test losses.

Order 1 is the contract's sum of member influences, ``Σ_{i∈U} I_up,loss(z_i, z_test)``, with the
predicted loss change ``−(1/n) Σ_{i∈U} I_up,loss``.

Order 2 follows Basu, You & Feizi (2020, "On Second-Order Group Influence Functions for
Black-Box Predictions", §3): retraining without U is the optimum of
``(1/(n − ε|U|)) Σ_{j} w_j ℓ_j(θ)`` with ``ℓ_j = L_j + (λ/2)‖θ‖²``, weight 1 − ε on U and 1
elsewhere, so ε = 1 removes U and the mean is renormalised over what remains (what retraining
does). Its optimality condition ``Σ_S ∇ℓ_j − ε Σ_U ∇ℓ_j = 0``, differentiated twice in ε at 0
with third derivatives dropped (as Basu et al. do), gives with ``H = ∇²R(θ̂) (+ δI)``:

    θ'  = (1/n) H⁻¹ b,                 b = Σ_U ∇L_j + |U| λ θ̂
    θ'' = (2/n) H⁻¹ (H_U + |U| λ I) θ',  H_U = Σ_U ∇²L_j(θ̂)
    Δθ ≈ θ' + θ''/2,                   Δℓ_test ≈ ∇ℓ_testᵀ Δθ

``θ'`` alone differs from order 1 only by the ``|U|λθ̂`` term (the renormalisation's first-order
effect, which the plain sum leaves out); the second term is the group's own curvature, which
makes the prediction grow faster than linearly for large coherent groups. Order 2 needs full
gradients (a projected run has no parameter-space Hessian-vector product). Both orders are
reported in ``I_up,loss`` units too: ``influence = −n · predicted_loss_change``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from .config import IHVPMethod
from .errors import QueryError
from .query.scoring import check_indices
from .results import GroupResult
from .run import Run

__all__ = ["GROUP_ORDERS", "HVP_CHUNK", "group_influence"]

GROUP_ORDERS = (1, 2)
HVP_CHUNK = 256  # group members per Hessian-vector product call


def _group_hessian_times(run: Run, group: np.ndarray, v: torch.Tensor) -> torch.Tensor:
    """``H_U v = Σ_{j∈U} ∇²L_j(θ̂) v`` for one vector v (p,)."""
    out = torch.zeros_like(v)
    for start in range(0, len(group), HVP_CHUNK):
        idx = torch.as_tensor(group[start : start + HVP_CHUNK], device=run.device)
        # Objective.hvp is the Hessian of the *mean* loss over the batch: scale back to a sum
        out += len(idx) * run.model.objective.hvp(run.model.theta, v[:, None], run.data.x_train[idx],
                                                  run.data.y_train[idx])[:, 0]
    return out


def group_influence(run: Run, train_ids: Sequence[int], test_ids: Sequence[int], *,
                    order: int = 1, ihvp: str | IHVPMethod | None = None) -> GroupResult:
    """Predicted effect of removing the training points ``train_ids`` (a set: repeats count once)
    on the loss of each test point in ``test_ids`` (in the given order); ``.to_dict()`` is the
    REST group-influence shape. On an ensemble run (:mod:`engine.ensemble`), the mean of the
    members' own predictions (each with its own θ̂, store and solver)."""
    if run.ensemble is None:
        return _one_model(run, train_ids, test_ids, order=order, ihvp=ihvp)
    parts = [_one_model(m, train_ids, test_ids, order=order, ihvp=ihvp) for m in run.ensemble.members()]
    change = np.mean([p.predicted_loss_change for p in parts], axis=0)  # (m,)
    return dataclasses.replace(parts[0], predicted_loss_change=change, influence=-run.n_train * change)


def _one_model(run: Run, train_ids: Sequence[int], test_ids: Sequence[int], *, order: int,
               ihvp: str | IHVPMethod | None) -> GroupResult:
    """:func:`group_influence` of one model (the run's own, ignoring ensemble members)."""
    if order not in GROUP_ORDERS:
        raise QueryError(f"order must be 1 or 2, got {order!r}")
    if len(train_ids) == 0:
        raise QueryError("train_ids is empty: a group needs at least one training point")
    if len(test_ids) == 0:
        raise QueryError("test_ids is empty: name at least one test point")
    group = np.unique(check_indices(list(train_ids), run.n_train, "train"))
    tests = check_indices(list(test_ids), run.n_test, "test")
    if order == 2 and run.store.projected:
        raise QueryError("second-order group influence needs full gradients; this run is projected")
    n, lam = run.n_train, run.config.weight_decay
    solver = run.solver(ihvp)
    g_test = run.queries.test_gradients(tests)  # (m, d)
    g_group = run.store.resident.row_sum(torch.as_tensor(group, device=run.device))  # (d,)
    if order == 1:
        change = g_test @ solver.solve(g_group[:, None].contiguous())[:, 0] / n
    else:
        first = solver.solve((g_group + len(group) * lam * run.model.theta)[:, None].contiguous())[:, 0] / n
        curv = _group_hessian_times(run, group, first) + len(group) * lam * first
        delta = first + solver.solve(curv[:, None].contiguous())[:, 0] / n
        change = g_test @ delta
    change_np = change.cpu().double().numpy()  # (m,)
    return GroupResult(order=order, group_size=len(group), ihvp=solver.method.value, test_ids=tests,
                       predicted_loss_change=change_np, influence=-n * change_np)
