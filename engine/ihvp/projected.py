"""The curvature of a projected run: ``C = PᵀHP`` (K×K) in the space of projected gradients.

With store rows ``Pᵀg_i`` and a test vector ``Pᵀg``, ``scores = −(GP) C⁻¹ Pᵀg``: a sketch of
``−gᵀ H⁻¹ g_i`` that is exact when P is square and invertible (K = p). C is formed from K
Hessian-vector products (``H P``), symmetrised, and solved by Cholesky like the exact solver.
"""

from __future__ import annotations

import torch

from ..config import IHVPMethod
from ..grads.projection import Projector
from .exact import ExactSolver
from .hvp import HVP

__all__ = ["ProjectedSolver", "projected_curvature"]


def projected_curvature(hvp: HVP, projector: Projector, *, block: int = 128) -> torch.Tensor:
    """``PᵀHP`` (K, K) from blocks of K Hessian-vector products."""
    k = projector.k
    c = torch.empty(k, k, dtype=projector.dtype, device=projector.device)
    for start in range(0, k, block):
        cols = slice(start, min(start + block, k))
        hp = hvp(projector.columns(cols))  # (p, kb)
        c[:, cols] = projector.project(hp.T).T  # Pᵀ(HP) (K, kb)
    return 0.5 * (c + c.T)


class ProjectedSolver(ExactSolver):
    """Solves in the projected space with the K×K curvature."""

    def __init__(self, curvature: torch.Tensor, *, explicit_inverse: bool | None = None) -> None:
        super().__init__(curvature, method=IHVPMethod.PROJECTED, explicit_inverse=explicit_inverse)
