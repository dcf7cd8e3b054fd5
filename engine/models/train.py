"""Training to θ̂ for the built-in models, on the objective of the contract:
``R(θ) = (1/n) Σ_i L(z_i, θ) + (λ/2)‖θ‖²``.

Convex models: full-batch L-BFGS, then Newton steps with a dense Hessian (when p is small)
until ‖∇R‖ < 1e-10, so θ̂ is the optimum to working precision. Networks: Adam on minibatches
(the L2 term inside the loss, not decoupled), then a full-batch L-BFGS polish towards a
stationary point, since influence functions assume ∇R(θ̂) ≈ 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..ihvp.hvp import dense_hessian, full_hvp
from .objective import Objective

__all__ = ["TrainResult", "objective_value_and_grad", "train_convex", "train_network",
           "NEWTON_MAX_PARAMS", "GRAD_TOL"]

NEWTON_MAX_PARAMS = 5000  # dense Newton steps only below this many parameters
GRAD_TOL = 1e-10  # target ‖∇R‖ for convex models (the contract requires < 1e-8)

Progress = Callable[[str], None]


@dataclass
class TrainResult:
    theta: torch.Tensor
    grad_norm: float
    objective: float
    iterations: dict[str, int]


def objective_value_and_grad(objective: Objective, theta: torch.Tensor, x: torch.Tensor,
                             y: torch.Tensor, *, weight_decay: float,
                             chunk: int = 4096) -> tuple[float, torch.Tensor]:
    """R(θ) and ∇R(θ) (p,) over the whole training set, in chunks."""
    n = len(x)
    value = 0.5 * weight_decay * float(theta @ theta)
    g = weight_decay * theta.detach().clone()
    for start in range(0, n, chunk):
        xb, yb = x[start : start + chunk], y[start : start + chunk]
        w = len(xb) / n
        value += w * float(objective.mean_loss(theta, xb, yb).detach())
        g += w * objective.loss_grad(theta, xb, yb)
    return value, g


def _lbfgs(objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
           weight_decay: float, steps: int) -> tuple[torch.Tensor, int]:
    param = torch.nn.Parameter(theta.detach().clone())
    opt = torch.optim.LBFGS([param], lr=1.0, max_iter=steps, history_size=50,
                            tolerance_grad=1e-12, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")
    evals = 0

    def closure() -> torch.Tensor:
        nonlocal evals
        evals += 1
        value, g = objective_value_and_grad(objective, param.detach(), x, y,
                                            weight_decay=weight_decay)
        param.grad = g
        return torch.tensor(value, dtype=param.dtype)

    opt.step(closure)
    return param.detach().clone(), evals


def train_convex(objective: Objective, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float,
                 log: Progress | None = None, warm: bool = False) -> TrainResult:
    """θ̂ of a convex model, from the module's current parameters (zero for ours).

    ``warm``: the start is already near the optimum (leave-one-out retraining from θ̂), so go
    straight to Newton steps when the model is small enough for them.
    """
    theta = objective.flat_params()
    evals = 0
    if not (warm and objective.n_params <= NEWTON_MAX_PARAMS):
        theta, evals = _lbfgs(objective, theta, x, y, weight_decay=weight_decay, steps=2000)
    value, g = objective_value_and_grad(objective, theta, x, y, weight_decay=weight_decay)
    if log:
        log(f"L-BFGS: {evals} evaluations, |grad R| = {float(g.norm()):.2e}")
    newton = 0
    if objective.n_params <= NEWTON_MAX_PARAMS:
        while float(g.norm()) > GRAD_TOL and newton < 30:
            hvp = full_hvp(objective, theta, x, y, shift=weight_decay)
            h = dense_hessian(hvp, objective.n_params, dtype=theta.dtype, device=theta.device)
            step = torch.linalg.solve(h, g)
            t = 1.0
            while True:  # backtracking: accept the first step that does not raise R
                cand = theta - t * step
                v_new, g_new = objective_value_and_grad(objective, cand, x, y,
                                                        weight_decay=weight_decay)
                if v_new <= value + 1e-14 * abs(value) or t < 1e-6:
                    break
                t *= 0.5
            theta, value, g = cand, v_new, g_new
            newton += 1
        if log:
            log(f"Newton: {newton} steps, |grad R| = {float(g.norm()):.2e}")
    return TrainResult(theta, float(g.norm()), value, {"lbfgs_evals": evals, "newton_steps": newton})


def train_network(objective: Objective, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float,
                  config: TrainConfig, seed: int,
                  epoch_bar: Callable[[int], None] | None = None) -> TrainResult:
    """θ̂ of a network: Adam on minibatches, then full-batch L-BFGS on R."""
    param = torch.nn.Parameter(objective.flat_params())
    opt = torch.optim.Adam([param], lr=config.lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = len(x)
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size].to(x.device)
            opt.zero_grad()
            loss = objective.mean_loss(param, x[idx], y[idx]) + 0.5 * weight_decay * (param @ param)
            loss.backward()
            opt.step()
        if epoch_bar:
            epoch_bar(1)
    theta, evals = _lbfgs(objective, param.detach(), x, y, weight_decay=weight_decay,
                          steps=config.lbfgs_steps)
    value, g = objective_value_and_grad(objective, theta, x, y, weight_decay=weight_decay)
    return TrainResult(theta, float(g.norm()), value, {"epochs": config.epochs, "lbfgs_evals": evals})
