"""Exact solves with a dense Hessian: Cholesky when H is positive definite, otherwise a
symmetric eigendecomposition (H may be indefinite at a network's θ̂; the solve is still H⁻¹)."""

from __future__ import annotations

from typing import Any

import torch

from ..config import IHVPMethod
from ..errors import SolverError
from .base import Solution

__all__ = ["ExactSolver"]

RESIDUAL_PROBE = 8  # seeded random right-hand sides whose residual ‖Hx − b‖/‖b‖ is reported


class ExactSolver:
    """``H⁻¹B`` from a dense symmetric H (d, d).

    The spectrum (``min_eigenvalue``, ``max_eigenvalue``, reported by :meth:`settings`) costs an
    eigendecomposition several times the Cholesky factorisation, so a positive definite H
    computes it only when first asked for.

    ``explicit_inverse`` (default: on a GPU) keeps H⁻¹ itself, made once from the factorisation,
    and solves by one matrix product: on a GPU two triangular solves of one right-hand side are
    latency-bound and cuSOLVER's are not known to be CUDA-graph capturable, while a product is
    both fast and capturable. The probed residual below measures whichever path is used.
    """

    def __init__(self, hessian: torch.Tensor, *, method: IHVPMethod = IHVPMethod.EXACT,
                 explicit_inverse: bool | None = None) -> None:
        self.method = method
        self.hessian = hessian
        self._chol: torch.Tensor | None = None
        self._positive = False
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None
        self._evals: tuple[float, float] | None = None
        factor, info = torch.linalg.cholesky_ex(hessian)
        if int(info) == 0:
            self._chol = factor
            self._positive = True
        else:
            vals, vecs = torch.linalg.eigh(hessian)
            self._evals = (float(vals[0]), float(vals[-1]))
            # singular to working precision: 1e-12 in float64, d·eps in float32 (a GPU run)
            floor = max(1e-12, hessian.shape[0] * torch.finfo(hessian.dtype).eps)
            if float(vals.abs().min()) <= floor * max(abs(self._evals[1]), 1.0):
                raise SolverError(
                    f"the Hessian is singular (smallest |eigenvalue| {float(vals.abs().min()):.3g}); "
                    "rebuild with --damping > 0 or a larger --weight-decay"
                )
            self._eig = (vals, vecs)
        self._inverse: torch.Tensor | None = None
        if hessian.device.type == "cuda" if explicit_inverse is None else explicit_inverse:
            if self._chol is not None:
                inverse = torch.cholesky_inverse(self._chol)
            else:
                vals, vecs = self._eig  # type: ignore[misc]
                inverse = (vecs / vals) @ vecs.T
            self._inverse = 0.5 * (inverse + inverse.T)  # (d, d), symmetric to rounding
            self._chol, self._eig = None, None  # only H⁻¹ is used from here: H and H⁻¹ held, not 3 d²
        # the factorisation's accuracy, measured once on a seeded probe: a query then costs one
        # solve (O(d²) per column) with no residual product on top
        gen = torch.Generator(device="cpu").manual_seed(0)
        probe = torch.randn(hessian.shape[0], RESIDUAL_PROBE, generator=gen, dtype=hessian.dtype)
        probe = probe.to(hessian.device)
        res = (hessian @ self._solve(probe) - probe).norm(dim=0) / probe.norm(dim=0)
        self.diagnostics: dict[str, Any] = {"max_relative_residual": float(res.max()),
                                            "residual_probe": RESIDUAL_PROBE}  # every solve's

    def _spectrum(self) -> tuple[float, float]:
        if self._evals is None:
            vals = torch.linalg.eigvalsh(self.hessian)
            self._evals = (float(vals[0]), float(vals[-1]))
        return self._evals

    @property
    def min_eigenvalue(self) -> float:
        return self._spectrum()[0]

    @property
    def max_eigenvalue(self) -> float:
        return self._spectrum()[1]

    @property
    def positive_definite(self) -> bool:
        return self._positive

    def settings(self) -> dict[str, Any]:
        low, high = self._spectrum()
        return {
            "method": self.method.value,
            "dim": int(self.hessian.shape[0]),
            "factorisation": "cholesky" if self.positive_definite else "eigh",
            "explicit_inverse": self._inverse is not None,
            "positive_definite": self.positive_definite,
            "min_eigenvalue": low,
            "max_eigenvalue": high,
            "condition_number": abs(high / low),
        }

    def _solve(self, b2: torch.Tensor) -> torch.Tensor:
        if self._inverse is not None:
            return self._inverse @ b2  # (d, m)
        if self._chol is not None:
            return torch.cholesky_solve(b2, self._chol)  # (d, m)
        assert self._eig is not None
        vals, vecs = self._eig
        return vecs @ ((vecs.T @ b2) / vals.unsqueeze(1))

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """H⁻¹B for B (d,) or (d, m)."""
        b2 = b.unsqueeze(1) if b.dim() == 1 else b
        x = self._solve(b2.to(self.hessian.dtype))
        return x.squeeze(1) if b.dim() == 1 else x

    def solve_report(self, b: torch.Tensor) -> Solution:
        """:meth:`solve` with the factorisation's probed residual (the same for every solve)."""
        return Solution(self.solve(b), dict(self.diagnostics))
