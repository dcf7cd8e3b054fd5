"""Hessian-vector products of the training objective, as callables for the solvers.

``H = ∇²[(1/n) Σ_i L(z_i, θ)] + (λ + δ)·I`` at θ̂: the data-loss Hessian is accumulated over
chunks of the training set, the regulariser λ and the damping δ are added in closed form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.objective import Objective

__all__ = ["HVP", "BatchHVP", "batch_hvp", "dense_hessian", "full_hvp", "work_blocks"]

HVP = Callable[[torch.Tensor], torch.Tensor]  # (p, m) -> (p, m)
BatchHVP = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (V (p, m), idx (b,)) -> (p, m)


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


WORK_BUDGET = 1 << 22  # activation elements per vmapped call (32 MiB in float64)
MAX_TANGENT_BLOCK = 256


def work_blocks(objective: Objective, x: torch.Tensor) -> tuple[int, int]:
    """(data_chunk, tangent_block) so one vmapped HVP call holds about WORK_BUDGET activations.

    Large calls are slower, not only bigger: a CNN's 1,898 HVPs over 1,297 digits took 120 s and
    9.6 GB in 2048 × 256 calls, about a quarter of that time and 0.8 GB in 64 × 32 calls.
    """
    per_sample = objective.activation_numel(x)
    pairs = max(WORK_BUDGET // per_sample, 1)  # sample × tangent pairs per call
    tangent_block = int(min(MAX_TANGENT_BLOCK, max(1, pairs // 64)))
    return max(1, pairs // tangent_block), tangent_block


def full_hvp(
    objective: Objective,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    shift: float,
    data_chunk: int | None = None,
    tangent_block: int | None = None,
) -> HVP:
    """V (p, m) ↦ H V with H the full-batch Hessian of the data loss plus ``shift``·I.

    ``shift`` is λ + δ. Work is split into data chunks × tangent blocks (sized by
    :func:`work_blocks` unless given) to bound memory and keep calls cache-friendly. A block of
    fewer tangents than the budget allows gets proportionally larger data chunks (the same
    sample × tangent pairs per call): one tangent over digits' 1,297 points in one call instead of
    eleven took 3.0 instead of 13.1 ms (2,410-parameter MLP), which is what a single CG query does.
    """
    n = len(x)
    auto_chunk, auto_block = work_blocks(objective, x)
    block = tangent_block or auto_block
    pairs = auto_chunk * auto_block  # sample × tangent pairs per vmapped call
    by_width: dict[int, list[slice]] = {}

    def chunks_for(width: int) -> list[slice]:
        if width not in by_width:
            by_width[width] = _blocks(n, data_chunk or max(1, pairs // width))
        return by_width[width]

    def hvp(vectors: torch.Tensor) -> torch.Tensor:
        squeeze = vectors.dim() == 1
        v = vectors.unsqueeze(1) if squeeze else vectors
        out = shift * v
        for cols in _blocks(v.shape[1], block):
            acc = torch.zeros_like(v[:, cols])
            for c in chunks_for(cols.stop - cols.start):
                w = (c.stop - c.start) / n  # the chunk's share of the mean
                acc += w * objective.hvp(theta, v[:, cols], x[c], y[c])
            out[:, cols] += acc
        return out.squeeze(1) if squeeze else out

    return hvp


def batch_hvp(
    objective: Objective,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    shift: float,
    tangent_block: int | None = None,
) -> BatchHVP:
    """(V, idx) ↦ H_idx V, the Hessian of the mean loss over the minibatch ``idx`` plus shift·I."""

    block = tangent_block or work_blocks(objective, x)[1]

    def hvp(vectors: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        xb, yb = x[idx], y[idx]
        out = shift * vectors
        for cols in _blocks(vectors.shape[1], block):
            out[:, cols] += objective.hvp(theta, vectors[:, cols], xb, yb)
        return out

    return hvp


def dense_hessian(hvp: HVP, n_params: int, *, dtype: torch.dtype, device: torch.device,
                  block: int = 256, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """The dense (p, p) matrix of ``hvp``, by applying it to blocks of the identity; symmetrised."""
    h = torch.empty(n_params, n_params, dtype=dtype, device=device)
    for cols in _blocks(n_params, block):
        eye = torch.zeros(n_params, cols.stop - cols.start, dtype=dtype, device=device)
        eye[torch.arange(cols.start, cols.stop), torch.arange(cols.stop - cols.start)] = 1.0
        h[:, cols] = hvp(eye)
        if progress is not None:
            progress(cols.stop - cols.start)
    return 0.5 * (h + h.T)
