"""Training to θ̂ for the built-in models, on the objective of the contract:
``R(θ) = (1/n) Σ_i L(z_i, θ) + (λ/2)‖θ‖²``.

Convex models: damped Newton with a dense Hessian until ‖∇R‖ < 1e-10, so θ̂ is the optimum to
working precision; from the start when the Hessian has a closed form (linear models), else after
full-batch L-BFGS (and only when p is small). Networks (:func:`train_network`): a bounded number
of epochs of minibatch Adam (or SGD with Nesterov momentum), the L2 term coupled (λθ added to the
gradient, not decoupled), the learning rate annealed to 0 by a cosine; then a full-batch L-BFGS
polish towards a stationary point, since influence functions assume ∇R(θ̂) ≈ 0. The epochs are
``min(epochs, ⌈max_samples / n⌉)``, so the minibatch phase costs at most ``max(max_samples, n)``
per-sample gradients; the polish stops at the first of ``lbfgs_steps`` iterations, L-BFGS's own
tolerance, ``polish_s`` seconds or ``polish_share`` × the epochs' time (but at least
POLISH_FLOOR_S seconds). What is left of
‖∇R(θ̂)‖ is recorded, and damping covers it. Networks with BatchNorm train in train mode (batch
statistics, running averages updated) and are evaluated, polished and explained in eval mode.
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
from .threads import intra_op_threads

__all__ = ["TrainResult", "lbfgs", "objective_value_and_grad", "planned_epochs", "stopping_rule", "train_convex",
           "train_network"]

NEWTON_FROM_START = 50  # Hessians Newton may form from the start before falling back to L-BFGS
CHORD_SHRINK = 0.5  # reuse the last Hessian while each step at least halves ‖∇R‖
CHORD_MAX_STEPS = 500  # Newton and chord steps together, at most
LBFGS_CHUNK = 10  # L-BFGS iterations between checks of the time budget
POLISH_FLOOR_S = 10.0  # the polish may take this long even after short epochs (small models, cheap passes)
FULL_BATCH_CHUNK = 512  # points per block of the polish's and the final R, ∇R (bounded activation memory)

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


class _OutOfTime(Exception):
    """The polish's time budget ran out during an evaluation."""


def lbfgs(objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
          weight_decay: float, steps: int, budget_s: float | None = None,
          progress: Callable[[int], None] | None = None, chunk: int = 4096
          ) -> tuple[torch.Tensor, int]:
    """Full-batch L-BFGS (strong Wolfe) on R from θ: (θ, evaluations). Stops after ``steps``
    iterations, at L-BFGS's tolerance, or once ``budget_s`` seconds are spent: checked before
    every evaluation of R, and then the evaluated θ with the lowest R is returned (the run is
    over budget by one evaluation at most). ``progress(k)`` is called with the iterations just
    done; ``chunk``: points per block of each full-batch evaluation."""
    param = torch.nn.Parameter(theta.detach().clone())
    per_call = min(steps, LBFGS_CHUNK) if budget_s is not None or progress else steps
    opt = torch.optim.LBFGS([param], lr=1.0, max_iter=max(per_call, 1), history_size=50,
                            tolerance_grad=1e-12, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")
    evals = 0
    start = time.perf_counter()
    best: tuple[float, torch.Tensor] = (float("inf"), param.detach().clone())

    def closure() -> torch.Tensor:
        nonlocal evals, best
        if budget_s is not None and evals and time.perf_counter() - start > budget_s:
            raise _OutOfTime
        evals += 1
        value, g = objective_value_and_grad(objective, param.detach(), x, y,
                                            weight_decay=weight_decay, chunk=chunk)
        if budget_s is not None and value < best[0]:
            best = (value, param.detach().clone())
        param.grad = g
        return torch.tensor(value, dtype=param.dtype)

    done = 0
    try:
        while done < steps:
            before = opt.state[param].get("n_iter", 0) if param in opt.state else 0
            opt.step(closure)
            ran = opt.state[param]["n_iter"] - before
            done += ran
            if progress:
                progress(ran)
            if ran < per_call:
                break  # converged to L-BFGS's tolerance
    except _OutOfTime:
        return best[1], evals
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


def planned_epochs(config: TrainConfig, n: int) -> int:
    """Epochs a network trains on n points: ``min(epochs, ⌈max_samples / n⌉)``, at least one, so
    the minibatch phase costs at most ``max(max_samples, n)`` per-sample gradients whatever n is."""
    budget = -(-config.max_samples // max(n, 1)) if config.max_samples > 0 else config.epochs
    return max(1, min(config.epochs, budget))


def stopping_rule(config: TrainConfig, n: int) -> str:
    """The documented stopping criterion of :func:`train_network` on n points, in words."""
    epochs = planned_epochs(config, n)
    schedule = "cosine learning rate to 0" if config.schedule == "cosine" else "constant learning rate"
    polish = ("no polish" if config.polish_s <= 0 or config.lbfgs_steps <= 0 else
              f"then full-batch L-BFGS until {config.lbfgs_steps} iterations, its tolerance, "
              f"{config.polish_s:g} s or max({config.polish_share:g}× the epochs' time, "
              f"{POLISH_FLOOR_S:g} s), skipped when one epoch (about one full-batch evaluation) "
              f"takes longer than that")
    return (f"{epochs} epochs of {config.optimizer} (min({config.epochs}, ⌈{config.max_samples:,} "
            f"samples / {n:,}⌉); batch {config.batch_size}, {schedule}), {polish}")


def _optimizer(params: list[torch.Tensor], config: TrainConfig, steps: int, weight_decay: float
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimiser of the epochs; ``weight_decay`` is the coupled L2 term (λθ added to the
    gradient: the gradient of (λ/2)‖θ‖², not AdamW's decoupled decay)."""
    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True,
                                                     weight_decay=weight_decay)
    elif config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}: use adam or sgd")
    if config.schedule == "cosine":
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    if config.schedule != "constant":
        raise ValueError(f"unknown schedule {config.schedule!r}: use cosine or constant")
    return opt, None


def _epochs(objective: Objective, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float,
            config: TrainConfig, epochs: int, gen: torch.Generator,
            epoch_bar: Callable[[int], None] | None) -> list[float]:
    """Minibatch training of the module's own tracked parameters, in place (plain PyTorch:
    ``loss_fn(model(x_b), y_b)``, backward, step); returns each epoch's mean data loss."""
    n = len(x)
    params = objective.params
    opt, schedule = _optimizer(params, config, epochs * -(-n // config.batch_size), weight_decay)
    model = objective.model
    model.train(_has_batch_norm(model))  # BatchNorm: batch statistics, running averages updated
    losses: list[float] = []
    try:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(x.device)  # (n,)
            total = torch.zeros((), dtype=x.dtype, device=x.device)
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]  # (b,)
                opt.zero_grad(set_to_none=True)
                loss = objective.loss_fn(model(objective.as_input(x[idx])), y[idx])  # scalar
                loss.backward()
                opt.step()
                if schedule is not None:
                    schedule.step()
                total += loss.detach() * len(idx)
            losses.append(float(total) / n)
            if epoch_bar:
                epoch_bar(1)
    finally:
        model.eval()
    return losses


def polish_budget(config: TrainConfig, *, epochs_s: float) -> float:
    """Seconds the L-BFGS polish may take after epochs that took ``epochs_s``: ``polish_s``, or
    ``polish_share`` of the epochs' time but at least ``POLISH_FLOOR_S``, whichever is less (0:
    no polish)."""
    if config.polish_s <= 0 or config.lbfgs_steps <= 0:
        return 0.0
    return min(config.polish_s, max(config.polish_share * epochs_s, POLISH_FLOOR_S))


def polish_skipped(budget: float, *, epochs_s: float, epochs: int) -> bool:
    """Whether one full-batch evaluation (about an epoch: ``epochs_s / epochs``) outlasts the
    polish's ``budget`` (60,000 images): the polish could not keep to it, and is skipped."""
    return epochs_s / max(epochs, 1) > budget


def train_network(objective: Objective, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float,
                  config: TrainConfig, seed: int, epoch_bar: Callable[[int], None] | None = None,
                  polish_bar: Callable[[int], None] | None = None) -> TrainResult:
    """θ̂ of a network on R(θ) = (1/n) Σ L(z_i, θ) + (λ/2)‖θ‖², λ = ``weight_decay``.

    Stopping criterion: :func:`planned_epochs` epochs of minibatch Adam or SGD (the learning rate
    annealed to 0 by a cosine, so θ̂ settles rather than ending on a full-size step), then a
    full-batch L-BFGS polish that stops at the first of ``lbfgs_steps`` iterations, its
    tolerance, ``polish_s`` seconds, or ``polish_share`` × the epochs' wall time but at least
    POLISH_FLOOR_S seconds (so the polish never dominates a long training); skipped when one epoch
    takes longer than that budget (a full-batch evaluation costs about an epoch, so not even one
    would fit: on 60,000 Fashion-MNIST images each took minutes). All of it runs with
    at most ``config.threads`` intra-op threads (:mod:`~engine.models.threads`). The epochs train the module's own parameters (plain
    PyTorch speed); a module with BatchNorm trains in train mode and is left in eval mode.
    Deterministic for a seed and thread count when ``polish_s`` is 0.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    epochs = planned_epochs(config, len(x))
    with intra_op_threads(config.threads) as threads:
        t, cpu = time.perf_counter(), time.process_time()
        if objective.functional:
            losses = _epochs(objective, x, y, weight_decay=weight_decay, config=config, epochs=epochs,
                             gen=gen, epoch_bar=epoch_bar)
        else:
            losses = _flat_epochs(objective, x, y, weight_decay=weight_decay, config=config,
                                  epochs=epochs, gen=gen, epoch_bar=epoch_bar)
        epochs_s, epochs_cpu_s = time.perf_counter() - t, time.process_time() - cpu
        theta = objective.flat_params()
        evals = 0
        budget = polish_budget(config, epochs_s=epochs_s)
        skipped = polish_skipped(budget, epochs_s=epochs_s, epochs=epochs)
        if config.polish_s > 0 and config.lbfgs_steps > 0 and budget > 0 and not skipped:
            theta, evals = lbfgs(objective, theta, x, y, weight_decay=weight_decay,
                                 steps=config.lbfgs_steps, budget_s=budget, progress=polish_bar,
                                 chunk=FULL_BATCH_CHUNK)
        value, g = objective_value_and_grad(objective, theta, x, y, weight_decay=weight_decay,
                                            chunk=FULL_BATCH_CHUNK)
    return TrainResult(theta, float(g.norm()), value,
                       {"epochs": epochs, "lbfgs_evals": evals, "optimizer": config.optimizer,
                        "polish_skipped": bool(skipped and config.polish_s > 0 and config.lbfgs_steps > 0),
                        "threads": threads, "epochs_s": round(epochs_s, 3),
                        "epochs_cpu_s": round(epochs_cpu_s, 3),
                        "epoch_losses": [round(v, 6) for v in losses]})


def _flat_epochs(objective: Objective, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float,
                 config: TrainConfig, epochs: int, gen: torch.Generator,
                 epoch_bar: Callable[[int], None] | None) -> list[float]:
    """The epochs on one flat θ (p,) through the objective: for modules that cannot be trained in
    place (TorchScript). θ is written back into the module at the end."""
    n = len(x)
    theta = torch.nn.Parameter(objective.flat_params())
    opt, schedule = _optimizer([theta], config, epochs * -(-n // config.batch_size), weight_decay)
    losses: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(x.device)  # (n,)
        total = 0.0
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]  # (b,)
            opt.zero_grad(set_to_none=True)
            loss = objective.mean_loss(theta, x[idx], y[idx])  # scalar
            loss.backward()
            opt.step()
            if schedule is not None:
                schedule.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / n)
        if epoch_bar:
            epoch_bar(1)
    objective.load_flat(theta.detach())
    return losses
