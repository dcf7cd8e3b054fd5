"""Exact solves with a dense Hessian: Cholesky when H is positive definite, otherwise a
symmetric eigendecomposition (H may be indefinite at a network's θ̂; the solve is still H⁻¹)."""

from __future__ import annotations

from typing import Any

import torch

from ..config import IHVPMethod
from ..errors import SolverError

__all__ = ["ExactSolver"]

RESIDUAL_PROBE = 8  # columns whose residual ‖Hx − b‖/‖b‖ each solve reports


class ExactSolver:
    """``H⁻¹B`` from a dense symmetric H (d, d)."""

    def __init__(self, hessian: torch.Tensor, *, method: IHVPMethod = IHVPMethod.EXACT) -> None:
        self.method = method
        self.hessian = hessian
        self.diagnostics: dict[str, Any] = {}
        self._chol: torch.Tensor | None = None
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None
        factor, info = torch.linalg.cholesky_ex(hessian)
        evals = torch.linalg.eigvalsh(hessian)
        self.min_eigenvalue = float(evals[0])
        self.max_eigenvalue = float(evals[-1])
        if int(info) == 0:
            self._chol = factor
        else:
            if float(evals.abs().min()) <= 1e-12 * max(abs(self.max_eigenvalue), 1.0):
                raise SolverError(
                    f"the Hessian is singular (smallest |eigenvalue| {float(evals.abs().min()):.3g}); "
                    "rebuild with --damping > 0 or a larger --weight-decay"
                )
            vals, vecs = torch.linalg.eigh(hessian)
            self._eig = (vals, vecs)

    @property
    def positive_definite(self) -> bool:
        return self._chol is not None

    def settings(self) -> dict[str, Any]:
        return {
            "method": self.method.value,
            "dim": int(self.hessian.shape[0]),
            "factorisation": "cholesky" if self.positive_definite else "eigh",
            "positive_definite": self.positive_definite,
            "min_eigenvalue": self.min_eigenvalue,
            "max_eigenvalue": self.max_eigenvalue,
            "condition_number": abs(self.max_eigenvalue / self.min_eigenvalue),
        }

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        b2 = b.unsqueeze(1) if b.dim() == 1 else b
        b2 = b2.to(self.hessian.dtype)
        if self._chol is not None:
            x = torch.cholesky_solve(b2, self._chol)  # (d, m)
        else:
            assert self._eig is not None
            vals, vecs = self._eig
            x = vecs @ ((vecs.T @ b2) / vals.unsqueeze(1))
        probe = slice(0, RESIDUAL_PROBE)  # a few columns: O(d²) per solve, not O(d²m)
        res = ((self.hessian @ x[:, probe] - b2[:, probe]).norm(dim=0)
               / b2[:, probe].norm(dim=0).clamp_min(1e-300))
        self.diagnostics = {"max_relative_residual": float(res.max()) if res.numel() else 0.0}
        return x.squeeze(1) if b.dim() == 1 else x
