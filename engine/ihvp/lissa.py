"""LiSSA (Agarwal, Bullins & Hazan 2017; as used by Koh & Liang 2017) on blocks of vectors.

Recursion, for all columns of B at once: ``X_j = B + (1 − d)·X_{j−1} − H_{S_j} X_{j−1} / s`` with
``H_{S_j}`` the Hessian on a fresh random minibatch S_j, scale s above the largest eigenvalue of H
and extra damping d; the estimate is ``X_J / s``, averaged over ``repeats`` independent runs. Its
fixed point is ``(H + d·s·I)⁻¹ B``. Two diagnostics: ``bias_bound = (1 − μ/s)^J`` bounds the relative error left by truncating the
series after J steps when μ ≤ the smallest eigenvalue of H (we pass μ = λ + δ, a valid bound when
the data-loss Hessian is positive semi-definite, i.e. for convex models); ``converged`` is
``bias_bound < tol``, and the recursion stops as soon as that holds (``depth`` is the most steps). ``last_relative_change`` is the size of the final step, which with
minibatches smaller than the training set stays at the level of the minibatch noise.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import IHVPMethod, LissaConfig
from .base import ThreadDiagnostics
from .hvp import HVP, BatchHVP

__all__ = ["Lissa", "largest_eigenvalue"]


def largest_eigenvalue(hvp: HVP, n_params: int, *, dtype: torch.dtype, device: torch.device,
                       iters: int = 30, seed: int = 0) -> float:
    """Power iteration on the full-batch ``hvp``: an estimate of H's largest |eigenvalue|."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(n_params, 1, generator=g, dtype=dtype).to(device)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        hv = hvp(v)
        lam = float(hv.norm())
        v = hv / max(lam, torch.finfo(dtype).tiny)
    return lam


class Lissa(ThreadDiagnostics):
    """``H⁻¹B`` by LiSSA on minibatch Hessian-vector products."""

    method = IHVPMethod.LISSA

    def __init__(self, hvp: BatchHVP, *, n_train: int, config: LissaConfig,
                 scale: float, min_eigenvalue_bound: float = 0.0) -> None:
        self.hvp = hvp
        self.mu = float(min_eigenvalue_bound)
        self.n_train = n_train
        self.config = config
        self.scale = float(scale)
        super().__init__()

    def settings(self) -> dict[str, Any]:
        c = self.config
        return {"method": self.method.value, "scale": self.scale, "damping": c.damping,
                "depth": c.depth, "repeats": c.repeats,
                "batch_size": min(c.batch_size, self.n_train), "tol": c.tol, "seed": c.seed}

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        c = self.config
        b2 = b.unsqueeze(1) if b.dim() == 1 else b
        gen = torch.Generator(device="cpu").manual_seed(c.seed)
        batch = min(c.batch_size, self.n_train)
        total = torch.zeros_like(b2)
        rate = max(1.0 - (c.damping + self.mu / self.scale), 0.0)
        known = self.mu > 0 or c.damping > 0  # else no bound on the truncation error is known
        steps_run, changes = [], []
        for _ in range(c.repeats):
            x = b2.clone()
            change = float("inf")
            step = 0
            for step in range(1, c.depth + 1):
                idx = torch.randperm(self.n_train, generator=gen)[:batch]
                x_new = b2 + (1.0 - c.damping) * x - self.hvp(x, idx) / self.scale
                change = float(((x_new - x).norm(dim=0) / x_new.norm(dim=0).clamp_min(torch.finfo(x_new.dtype).tiny)).max())
                x = x_new
                if known and rate**step < c.tol:
                    break  # the series' tail is below tol: more steps only add minibatch noise
            steps_run.append(step)
            changes.append(change)
            total += x / self.scale
        bias = float(rate ** min(steps_run)) if known else 1.0
        self.diagnostics = {
            "steps": steps_run,
            "last_relative_change": max(changes),
            "bias_bound": bias,
            "converged": bias < c.tol,
        }
        out = total / c.repeats
        return out.squeeze(1) if b.dim() == 1 else out
