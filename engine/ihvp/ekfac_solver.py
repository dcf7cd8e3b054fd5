"""``H⁻¹B`` with EK-FAC curvature (factors from :mod:`engine.ihvp.ekfac`), in the store's space.

Per layer block X (d_out, d_in) of a store-space vector (row-major ``vec(X)``):
``H X = Q_S [(Q_Sᵀ X Q_A) ⊙ (Λ + shift)] Q_Aᵀ`` and ``H⁻¹ X = Q_S [(Q_Sᵀ X Q_A) / (Λ + shift)] Q_Aᵀ``,
i.e. ``H = (Q_S ⊗ Q_A) diag(vec Λ + shift) (Q_S ⊗ Q_A)ᵀ`` block-diagonal over layers, and
``H_jj = E[g_j²] + shift`` on the coordinates outside every block. ``shift = λ + δ`` (weight
decay plus damping, reported apart) is added to every corrected eigenvalue, where kronfluence
adds its ``damping_factor`` (default 1e-8; ``None``: 0.1 × the layer's mean Λ,
:func:`heuristic_damping`). The eigenvalues of H are exactly ``Λ + shift`` (and the rest
diagonal), so the spectrum is reported at no cost.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import IHVPMethod
from ..errors import SolverError
from .base import Solution
from .ekfac import EKFACFactors

__all__ = ["EKFACSolver", "heuristic_damping"]

METHOD = IHVPMethod.EKFAC
RESIDUAL_PROBE = 4  # seeded random right-hand sides whose ‖H(H⁻¹b) − b‖/‖b‖ is reported
SOLVE_BLOCK_ELEMENTS = 1 << 25  # columns × d_out × d_in rotated at once (256 MiB of float64)
HEURISTIC_DAMPING_SCALE = 0.1  # kronfluence's constant


def heuristic_damping(factors: EKFACFactors) -> dict[str, float]:
    """kronfluence's default damping per layer, ``0.1 × mean(Λ)`` (reported, never applied)."""
    return {name: HEURISTIC_DAMPING_SCALE * float(f.lambda_matrix.mean())
            for name, f in factors.layers.items()}


class EKFACSolver:
    """``H⁻¹B`` for B (d,) or (d, m) in the store's space (d = ``factors.dim``), in ``dtype``
    (default float64) on ``device`` (default: the factors')."""

    method = METHOD

    def __init__(self, factors: EKFACFactors, *, weight_decay: float = 0.0, damping: float = 0.0,
                 dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> None:
        self.factors = factors
        self.weight_decay, self.damping = float(weight_decay), float(damping)
        self.shift = self.weight_decay + self.damping
        self.dtype = dtype
        self.device = device or factors.rest_diagonal.device
        self._layers = []
        low, high = float("inf"), float("-inf")
        for blk in factors.layout:
            f = factors.layers[blk.name]
            eig = f.lambda_matrix.to(torch.float64) + self.shift  # (d_out, d_in)
            low, high = min(low, float(eig.min())), max(high, float(eig.max()))
            index = None if blk.contiguous else blk.index().to(self.device)  # (d_out·d_in,)
            self._layers.append((blk, index, *(t.to(device=self.device, dtype=dtype) for t in (
                f.gradient_eigenvectors, f.activation_eigenvectors, eig))))
        rest_eig = factors.rest_diagonal.to(torch.float64) + self.shift  # (r,)
        if len(rest_eig):
            low, high = min(low, float(rest_eig.min())), max(high, float(rest_eig.max()))
        self._rest = (factors.rest.to(self.device), rest_eig.to(device=self.device, dtype=dtype))
        if not low > 0:
            raise SolverError(f"the EK-FAC curvature has eigenvalue {low:.3g} ≤ 0; "
                              "rebuild with --damping > 0 or a larger --weight-decay")
        self.min_eigenvalue, self.max_eigenvalue = low, high
        gen = torch.Generator(device="cpu").manual_seed(0)
        probe = torch.randn(factors.dim, RESIDUAL_PROBE, generator=gen, dtype=dtype).to(self.device)
        res = (self.apply(self.solve(probe)) - probe).norm(dim=0) / probe.norm(dim=0)
        self.diagnostics: dict[str, Any] = {"max_relative_residual": float(res.max()),
                                            "residual_probe": RESIDUAL_PROBE}

    def _map(self, b: torch.Tensor, *, inverse: bool) -> torch.Tensor:
        b2 = (b.unsqueeze(1) if b.dim() == 1 else b).to(device=self.device, dtype=self.dtype)  # (d, m)
        if b2.shape[0] != self.factors.dim:
            raise ValueError(f"EK-FAC acts on vectors of {self.factors.dim}, got {b2.shape[0]}")
        m = b2.shape[1]
        out = torch.empty_like(b2)  # (d, m)
        for blk, index, q_s, q_a, eig in self._layers:
            rows = slice(blk.offset, blk.offset + blk.size) if index is None else index
            step = max(1, SOLVE_BLOCK_ELEMENTS // blk.size)
            for start in range(0, m, step):
                cols = slice(start, min(start + step, m))
                x = b2[rows, cols].T.reshape(-1, blk.d_out, blk.d_in)  # (c, d_out, d_in)
                y = q_s.T @ x @ q_a  # (c, d_out, d_in) in the Kronecker eigenbasis
                y = y / eig if inverse else y * eig
                out[rows, cols] = (q_s @ y @ q_a.T).reshape(-1, blk.size).T
        index, rest_eig = self._rest
        if len(index):
            scale = rest_eig.unsqueeze(1)  # (r, 1)
            out[index] = b2[index] / scale if inverse else b2[index] * scale
        return out.squeeze(1) if b.dim() == 1 else out

    def apply(self, b: torch.Tensor) -> torch.Tensor:
        """``H B`` with the EK-FAC curvature itself (B (d,) or (d, m))."""
        return self._map(b, inverse=False)

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """``H⁻¹B`` for B (d,) or (d, m)."""
        return self._map(b, inverse=True)

    def solve_report(self, b: torch.Tensor) -> Solution:
        """:meth:`solve` with the probed residual ``‖H(H⁻¹b) − b‖/‖b‖`` (measured once)."""
        return Solution(self.solve(b), dict(self.diagnostics))

    def settings(self) -> dict[str, Any]:
        f = self.factors
        return {
            "method": getattr(self.method, "value", self.method),
            "dim": f.dim,
            "layers": [{"name": blk.name, "d_out": blk.d_out, "d_in": blk.d_in, "offset": blk.offset,
                        "bias_offset": blk.bias_offset,
                        "samples": f.layers[blk.name].num_samples,
                        "positions": f.layers[blk.name].num_positions}
                       for blk in f.layout],
            "rest": len(f.rest),
            "weight_decay": self.weight_decay,
            "damping": self.damping,
            "shift": self.shift,
            "kronfluence_heuristic_damping": heuristic_damping(f),
            "dtype": str(self.dtype).removeprefix("torch."),
            "min_eigenvalue": self.min_eigenvalue,
            "max_eigenvalue": self.max_eigenvalue,
            "condition_number": self.max_eigenvalue / self.min_eigenvalue,
        }
