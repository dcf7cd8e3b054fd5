"""Training-set attacks (Koh & Liang 2017, §5.2): bounded changes to a few training images that
flip a chosen test prediction once the model is retrained on them.

How a perturbation δ of training input x_i moves a test loss: moving z_i to z_i + δ changes θ̂ by
about ``−(1/n) H⁻¹ ∇x∇θL(z_i, θ̂) δ``, so the test loss by about ``(1/n) I_pert,loss(z_i, z_test)ᵀ δ``
with ``I_pert,loss(z_i, z_test)ᵀ = −∇θL(z_test, θ̂)ᵀ H⁻¹ ∇x∇θL(z_i, θ̂)`` (:func:`pixel_influence`).

The attack raises the test point's margin loss ``f_r(x) − f_y(x)`` (y its label, r the best
other class; the prediction flips when it turns positive), with the same formula and the
margin's gradient in place of ∇θL(z_test): it picks the ``n_points`` training points whose
pixels can move the margin most within the bound (largest ``ε·‖I_pert‖₁``), then repeats (at most ``iterations`` times): compute I_pert at the
current θ, take a signed step ``δ_i ← clip(δ_i + α·sign(I_pert), −ε, ε)``
(and keep pixels inside the data's range), retrain on the perturbed set, and stop as soon as
the retrained model's prediction changes. ε is in the units of the inputs (digits: [0, 1]).
Only the retrained model's prediction counts as success.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .config import ModelKind
from .errors import QueryError
from .ihvp import ExactSolver, full_hessian
from .models.svm import to_flat as svm_to_flat
from .models.svm import train_hinge_svm
from .models.train import lbfgs
from .query.scoring import check_indices
from .run import Run
from .validate import retrain_convex

__all__ = ["attack", "pixel_influence"]


def _solver_at(run: Run, theta: torch.Tensor, x: torch.Tensor) -> ExactSolver:
    limit = run.config.train.newton_max_params
    if run.model.n_params > limit:
        raise QueryError(f"attacks need a dense Hessian: this model has {run.model.n_params} "
                         f"parameters (at most {limit})")
    shift = run.config.weight_decay + run.config.damping
    # closed form for linear models, assembled from Hessian-vector products otherwise
    return ExactSolver(full_hessian(run.model.objective, theta, x, run.data.y_train, shift=shift))


def _margin_grad(run: Run, theta: torch.Tensor, test_id: int) -> torch.Tensor:
    """∇θ of the test point's margin loss ``f_r(x) − f_y(x)`` (r: the best wrong class now);
    the prediction flips exactly when it turns positive."""
    xt = run.data.x_test[test_id : test_id + 1]
    label = int(run.data.y_test[test_id])
    with torch.no_grad():
        logits = run.model.objective.logits(theta, xt)[0].clone()
    logits[label] = -torch.inf
    rival = int(logits.argmax())

    def margin(th: torch.Tensor) -> torch.Tensor:
        f = run.model.objective.logits(th, xt)[0]
        return f[rival] - f[label]

    th = theta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(margin(th), th)[0]


def _pixel_influence(run: Run, theta: torch.Tensor, solver: ExactSolver, train_idx: torch.Tensor,
                     x: torch.Tensor, test_grad: torch.Tensor) -> torch.Tensor:
    s = solver.solve(test_grad)  # (p,) H⁻¹∇θ(test objective)
    return -run.model.objective.input_grad_dot(theta, s, x[train_idx], run.data.y_train[train_idx])


def pixel_influence(run: Run, train_ids: list[int], test_id: int) -> np.ndarray:
    """``I_pert,loss(z_i, z_test)`` for each training point, shaped like its input (k, *shape):
    a positive pixel raises the test loss when brightened (change ≈ I·δ/n)."""
    train = torch.as_tensor(check_indices(train_ids, run.n_train, "train"), device=run.device)
    t = int(check_indices(test_id, run.n_test, "test")[0])
    solver = _solver_at(run, run.model.theta, run.data.x_train)
    g = run.model.objective.loss_grad(run.model.theta, run.data.x_test[t : t + 1], run.data.y_test[t : t + 1])
    return _pixel_influence(run, run.model.theta, solver, train, run.data.x_train, g).cpu().double().numpy()


def _retrain(run: Run, theta: torch.Tensor, x: torch.Tensor, *, solver: ExactSolver,
             lbfgs_steps: int) -> torch.Tensor:
    obj, lam, kind = run.model.objective, run.config.weight_decay, run.info.model.kind
    if kind is ModelKind.SVM:
        rows = train_hinge_svm(x.cpu().double().numpy(), run.data.y_train.cpu().numpy(),
                               n_classes=run.dataset.n_classes, weight_decay=lam, seed=run.config.seed)
        return torch.from_numpy(svm_to_flat(rows)).to(run.device, run.model.dtype)
    obj.load_flat(theta)
    try:
        if kind is ModelKind.LOGREG:  # chord steps with the current H, Newton if they stall
            return retrain_convex(obj, theta, x, run.data.y_train, lam=lam, newton=solver,
                                  config=run.config.train)
        return lbfgs(obj, theta, x, run.data.y_train, weight_decay=lam, steps=lbfgs_steps)[0]
    finally:
        obj.load_flat(run.model.theta)


def attack(run: Run, test_id: int, *, n_points: int = 60, epsilon: float = 0.5,
           step: float | None = None, iterations: int = 10, lbfgs_steps: int = 300,
           on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Perturb ``n_points`` training images within ‖δ‖∞ ≤ ``epsilon`` to flip ``test_id``'s
    prediction after retraining. Returns the chosen ids, their original and perturbed inputs
    and δ, the test point's probabilities before and after, and whether it flipped.
    ``on_step(done, total)`` is called after each retraining. Defaults: on digits logreg (1,297
    training images, inputs in [0, 1]) and 10 correctly classified test points, 60 images at
    ε = 0.5 flipped 9 of 10 predictions after retraining; 30 images 5 of 10; 10 images 1 of 10;
    30 images at ε = 0.25, 3 of 10 (bench/attack_bench.py)."""
    t0 = time.perf_counter()
    t = int(check_indices(test_id, run.n_test, "test")[0])
    if not epsilon > 0 or n_points < 1 or iterations < 1:
        raise QueryError("epsilon must be > 0, n_points and iterations at least 1")
    alpha = step if step is not None else epsilon / 4
    # the points whose pixels move the margin most within the box: largest ε·‖I_pert‖₁, the
    # first-order change a full step δ = ε·sign(I_pert) buys (well-fitted points have tiny
    # ∇x∇θL, so the most influential points by I_up,loss are not the most pliable ones)
    solver0 = _solver_at(run, run.model.theta, run.data.x_train)
    everyone = torch.arange(run.n_train, device=run.device)
    reach = torch.cat([_pixel_influence(run, run.model.theta, solver0, block, run.data.x_train,
                                        _margin_grad(run, run.model.theta, t)).flatten(1).abs().sum(dim=1)
                       for block in everyone.split(1024)])  # (n,)
    chosen = torch.argsort(reach, descending=True, stable=True)[:n_points]
    lo, hi = float(run.data.x_train.min()), float(run.data.x_train.max())
    x = run.data.x_train.clone()
    original = x[chosen].clone()
    theta = run.model.theta
    label = int(run.data.y_test[t])
    before = run.predict_proba(run.data.x_test[t : t + 1])[0]
    history = []
    flipped = False
    for it in range(iterations):
        solver = _solver_at(run, theta, x)
        direction = torch.sign(_pixel_influence(run, theta, solver, chosen, x,
                                                _margin_grad(run, theta, t)))  # raise the margin loss
        delta = (x[chosen] + alpha * direction - original).clamp(-epsilon, epsilon)
        x[chosen] = (original + delta).clamp(lo, hi)
        theta = _retrain(run, theta, x, solver=solver, lbfgs_steps=lbfgs_steps)
        with torch.no_grad():
            proba = torch.softmax(run.model.objective.logits(theta, run.data.x_test[t : t + 1]), dim=1)[0]
        history.append({"iteration": it + 1, "p_true": float(proba[label]),
                        "predicted": int(proba.argmax())})
        if on_step:
            on_step(it + 1, iterations)
        if int(proba.argmax()) != label:
            flipped = True
            break
    run.model.objective.load_flat(run.model.theta)
    after = proba.cpu().double().numpy()
    return {
        "test_id": t, "label": label, "train_ids": chosen.cpu().tolist(), "epsilon": epsilon,
        "step": alpha, "iterations": len(history), "flipped": flipped,
        "predicted_before": int(before.argmax()), "predicted_after": int(after.argmax()),
        "proba_before": before.tolist(), "proba_after": after.tolist(), "history": history,
        "original": original.cpu().double().numpy(), "perturbed": x[chosen].cpu().double().numpy(),
        "max_abs_delta": float((x[chosen] - original).abs().max()),
        "ground_truth": "retrained on the perturbed training set",
        "seconds": time.perf_counter() - t0,
    }
