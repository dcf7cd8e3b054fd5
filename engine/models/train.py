"""Training to θ̂ for the built-in models, on the objective of the contract:
``R(θ) = (1/n) Σ_i L(z_i, θ) + (λ/2)‖θ‖²``.

Convex models: damped Newton with a dense Hessian until ‖∇R‖ < 1e-10, so θ̂ is the optimum to
working precision; from the start when the Hessian has a closed form (linear models), else after
full-batch L-BFGS (and only when p is small). Networks: ``epochs`` of Adam (or SGD with momentum
and a cosine learning rate) on minibatches (the L2 term inside the loss, not decoupled), then a
full-batch L-BFGS polish towards a stationary point, since influence functions assume
∇R(θ̂) ≈ 0. The polish stops at the first of: ``lbfgs_steps`` iterations, L-BFGS's own tolerance,
or ``polish_s`` seconds; what is left of ‖∇R(θ̂)‖ is recorded, and damping covers it.
Networks with BatchNorm train in train mode (batch statistics, running averages updated) and
are evaluated, polished and explained in eval mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import TrainConfig
from ..ihvp.hessian import full_hessian, linear_layer
from .objective import Objective

__all__ = ["TrainResult", "lbfgs", "objective_value_and_grad", "train_convex", "train_network"]

NEWTON_FROM_START = 50  # Hessians Newton may form from the start before falling back to L-BFGS
CHORD_SHRINK = 0.5  # reuse the last Hessian while each step at least halves ‖∇R‖
CHORD_MAX_STEPS = 500  # Newton and chord steps together, at most
LBFGS_CHUNK = 10  # L-BFGS iterations between checks of the time budget

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
        loss, grad = objective.loss_value_and_grad(theta, xb, yb)
        value += w * float(loss)
        g += w * grad
    return value, g


def lbfgs(objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
          weight_decay: float, steps: int, budget_s: float | None = None,
          progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int]:
    """Full-batch L-BFGS (strong Wolfe) on R from θ: (θ, evaluations). Stops after ``steps``
    iterations, at L-BFGS's tolerance, or once ``budget_s`` seconds are spent (checked every
    ``LBFGS_CHUNK`` iterations); ``progress(k)`` is called with the iterations just done."""
    param = torch.nn.Parameter(theta.detach().clone())
    chunk = min(steps, LBFGS_CHUNK) if budget_s is not None or progress else steps
    opt = torch.optim.LBFGS([param], lr=1.0, max_iter=max(chunk, 1), history_size=50,
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

    start, done = time.perf_counter(), 0
    while done < steps:
        before = opt.state[param].get("n_iter", 0) if param in opt.state else 0
        opt.step(closure)
        ran = opt.state[param]["n_iter"] - before
        done += ran
        if progress:
            progress(ran)
        if ran < chunk or (budget_s is not None and time.perf_counter() - start > budget_s):
            break  # converged to L-BFGS's tolerance, or out of time
    return param.detach().clone(), evals


def _newton(objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
            weight_decay: float, max_steps: int, grad_tol: float
            ) -> tuple[torch.Tensor, float, torch.Tensor, int, int]:
    """Damped Newton on R from θ until ‖∇R‖ ≤ ``grad_tol``, with at most ``max_steps`` Hessians.

    A Newton step ``−H(θ)⁻¹∇R(θ)`` backtracks (Armijo) from the full step. While the gradient
    keeps shrinking by CHORD_SHRINK or more per step, the next steps reuse the last Hessian's
    Cholesky factor (chord steps: one gradient each, no new Hessian); a chord step that does not
    decrease R enough, or shrinks the gradient less, hands over to a fresh Newton step. The fixed
    point is the same optimum. Returns (θ, R(θ), ∇R(θ), Hessians formed, chord steps taken).
    """
    value, g = objective_value_and_grad(objective, theta, x, y, weight_decay=weight_decay)
    hessians = steps = chords = 0
    factor: torch.Tensor | None = None
    while float(g.norm()) > grad_tol and steps < CHORD_MAX_STEPS:
        fresh = factor is None
        if factor is None:
            if hessians == max_steps:
                break
            h = full_hessian(objective, theta, x, y, shift=weight_decay)
            hessians += 1
            factor, info = torch.linalg.cholesky_ex(h)
            if int(info) != 0:
                break  # H is not positive definite here: leave it to the caller's fallback
        step = torch.cholesky_solve(g.unsqueeze(1), factor)[:, 0]  # (p,)
        slope = float(g @ step)  # > 0: a descent direction
        t = 1.0
        while True:  # a chord step is taken whole or not at all; a Newton step backtracks
            cand = theta - t * step
            v_new, g_new = objective_value_and_grad(objective, cand, x, y, weight_decay=weight_decay)
            if v_new <= value - 1e-4 * t * slope + 1e-14 * abs(value) or not fresh or t < 1e-6:
                break
            t *= 0.5
        steps += 1
        if not fresh and not v_new <= value - 1e-4 * slope + 1e-14 * abs(value):
            factor = None  # the old Hessian no longer gives descent: form a new one
            continue
        shrink = float(g_new.norm()) / max(float(g.norm()), torch.finfo(g.dtype).tiny)
        theta, value, g = cand, v_new, g_new
        chords += not fresh
        if shrink > CHORD_SHRINK:
            factor = None
    return theta, value, g, hessians, chords


def train_convex(objective: Objective, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float,
                 log: Progress | None = None, warm: bool = False,
                 config: TrainConfig | None = None) -> TrainResult:
    """θ̂ of a convex model, from the module's current parameters (zero for ours).

    When the dense Hessian has a closed form (linear models, :func:`~engine.ihvp.hessian.linear_layer`)
    and p ≤ ``config.newton_max_params``, damped Newton (:func:`_newton`, with chord steps) runs from the
    start: on digits 2 Hessians of ~10 ms and a dozen gradients. Should it not reach ``grad_tol``
    with NEWTON_FROM_START Hessians, or meet an H that is not positive definite (λ = 0), and for
    other models, L-BFGS runs first and Newton steps polish. ``warm``: the start is already
    near the optimum (leave-one-out retraining from θ̂), so go straight to Newton steps when the
    model is small enough for them.
    """
    theta = objective.flat_params()
    config = config or TrainConfig()
    small = objective.n_params <= config.newton_max_params
    tol = config.grad_tol
    evals = newton = chords = 0
    done = False
    if small and (warm or linear_layer(objective) is not None):
        theta, value, g, newton, chords = _newton(objective, theta, x, y, weight_decay=weight_decay,
                                                  max_steps=NEWTON_FROM_START, grad_tol=tol)
        done = float(g.norm()) <= tol
        if log:
            log(f"Newton from the start: {newton} steps (+{chords} chord steps), "
                f"|grad R| = {float(g.norm()):.2e}")
    if not done:
        theta, evals = lbfgs(objective, theta, x, y, weight_decay=weight_decay, steps=2000)
        value, g = objective_value_and_grad(objective, theta, x, y, weight_decay=weight_decay)
        if log:
            log(f"L-BFGS: {evals} evaluations, |grad R| = {float(g.norm()):.2e}")
        if small:
            theta, value, g, polish, more = _newton(objective, theta, x, y,
                                                    weight_decay=weight_decay, max_steps=30, grad_tol=tol)
            newton += polish
            chords += more
            if log:
                log(f"Newton: {polish} steps, |grad R| = {float(g.norm()):.2e}")
    return TrainResult(theta, float(g.norm()), value,
                       {"lbfgs_evals": evals, "newton_steps": newton, "chord_steps": chords})


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _optimizer(params: list[torch.Tensor], config: TrainConfig, steps: int
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr), None
    raise ValueError(f"unknown optimizer {config.optimizer!r}: use adam or sgd")


def train_network(objective: Objective, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float,
                  config: TrainConfig, seed: int, epoch_bar: Callable[[int], None] | None = None,
                  polish_bar: Callable[[int], None] | None = None) -> TrainResult:
    """θ̂ of a network: ``config.epochs`` of minibatch Adam or SGD on R, then a bounded full-batch
    L-BFGS polish (see the module docstring). A module with BatchNorm trains in train mode (its
    own parameters, batch statistics) and is put back in eval mode for the polish and after."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = len(x)
    steps = config.epochs * -(-n // config.batch_size)
    module_mode = _has_batch_norm(objective.model) and objective.functional
    if module_mode:
        params = [p for p in objective.model.parameters() if p.requires_grad]
        objective.model.train()
    else:
        params = [torch.nn.Parameter(objective.flat_params())]
    opt, schedule = _optimizer(params, config, steps)
    try:
        for _ in range(config.epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size].to(x.device)
                opt.zero_grad()
                if module_mode:
                    out = objective.model(objective.as_input(x[idx]))
                    loss = objective.loss_fn(out, y[idx]) + 0.5 * weight_decay * sum(
                        (p * p).sum() for p in params)
                else:
                    theta = params[0]
                    loss = objective.mean_loss(theta, x[idx], y[idx]) + 0.5 * weight_decay * (theta @ theta)
                loss.backward()
                opt.step()
                if schedule is not None:
                    schedule.step()
            if epoch_bar:
                epoch_bar(1)
    finally:
        objective.model.eval()
    start_theta = objective.flat_params() if module_mode else params[0].detach()
    evals = 0
    theta = start_theta
    if config.polish_s > 0 and config.lbfgs_steps > 0:
        theta, evals = lbfgs(objective, start_theta, x, y, weight_decay=weight_decay,
                             steps=config.lbfgs_steps, budget_s=config.polish_s, progress=polish_bar)
    value, g = objective_value_and_grad(objective, theta, x, y, weight_decay=weight_decay)
    return TrainResult(theta, float(g.norm()), value,
                       {"epochs": config.epochs, "lbfgs_evals": evals, "optimizer": config.optimizer})
