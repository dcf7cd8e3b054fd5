"""Per-sample training gradients, computed in chunks with ``vmap(grad)`` and streamed to a sink."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.objective import Objective
from .chunks import stream_rows
from .projection import Projector

__all__ = ["per_sample_grads", "per_sample_grads_loop"]


def per_sample_grads(
    objective: Objective,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    chunk_size: int = 512,
    projector: Projector | None = None,
    sink: Callable[[slice, torch.Tensor], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor | None:
    """Rows ``∇θ L(z_i, θ)`` (n, p), or ``(∇θ L)·P`` (n, K) with a projector.

    With a ``sink`` each chunk is handed over as ``sink(rows, block)`` and nothing is returned;
    without one the whole (n, d) matrix is returned.
    """

    def one(rows: slice) -> torch.Tensor:
        g = objective.sample_grads(theta, x[rows], y[rows])  # (b, p)
        return projector.project(g) if projector is not None else g  # (b, K) with a projector

    width = projector.k if projector is not None else objective.n_params
    return stream_rows(len(x), chunk_size, one, sink=sink, progress=progress,
                       empty=lambda: torch.empty(0, width, dtype=objective.dtype, device=objective.device))


def per_sample_grads_loop(
    objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Reference: one autograd call per sample (slow; for tests). Returns (n, p)."""
    rows = []
    for i in range(len(x)):
        t = theta.detach().clone().requires_grad_(True)
        loss = objective.loss_fn(objective.logits(t, x[i : i + 1]), y[i : i + 1].to(t.device))
        (g,) = torch.autograd.grad(loss, t)
        rows.append(g)
    return torch.stack(rows)
