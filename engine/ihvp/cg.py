"""Block conjugate gradients for many right-hand sides at once.

All columns of B share one block Krylov space ``span{R, HR, H²R, …}``: each step orthonormalises
the unconverged residuals against the basis built so far (twice, for stability), drops directions
that are numerically dependent, applies H to the new block in one batched Hessian-vector product,
and takes the Galerkin solution ``X = X₀ + Q (QᵀHQ)⁻¹ Qᵀ R₀``. For SPD H this is block CG
(O'Leary 1980) in its stable, rank-revealing form: with m right-hand sides the space grows by up
to m directions per step, so 500 test points of a 650-parameter model converge in two steps
instead of hundreds of single-vector iterations. When the basis would exceed ``max_dim`` vectors
the method restarts from the current iterate. Residuals reported are ``‖HX − B‖/‖B‖`` per column,
computed from actual Hessian-vector products.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import CGConfig, IHVPMethod
from .hvp import HVP

__all__ = ["BlockCG"]

_DEPENDENCE = 1e-8  # a new direction must keep this fraction of a unit residual after orthogonalisation


class BlockCG:
    """``H⁻¹B`` by block conjugate gradients on a batched ``hvp`` callable."""

    method = IHVPMethod.CG

    def __init__(self, hvp: HVP, config: CGConfig = CGConfig()) -> None:
        self.hvp = hvp
        self.config = config
        self.diagnostics: dict[str, Any] = {}

    def settings(self) -> dict[str, Any]:
        return {"method": self.method.value, "tol": self.config.tol,
                "max_iter": self.config.max_iter, "max_dim": self.config.max_dim}

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b2 = b.unsqueeze(1) if b.dim() == 1 else b
        p, m = b2.shape
        bnorm = b2.norm(dim=0).clamp_min(torch.finfo(b2.dtype).tiny)  # (m,)
        x = torch.zeros_like(b2)
        r = b2.clone()
        x0, r0 = x.clone(), r.clone()
        q = b2.new_empty(p, 0)
        hq = b2.new_empty(p, 0)
        t = b2.new_empty(0, 0)
        steps = hvps = restarts = 0
        eps = torch.finfo(b2.dtype).eps
        rel = r.norm(dim=0) / bnorm
        while steps < cfg.max_iter:
            active = rel > cfg.tol
            if not bool(active.any()):
                break
            w = r[:, active]
            w = w / w.norm(dim=0)  # unit columns: singular values then measure dependence only
            for _ in range(2):
                w = w - q @ (q.T @ w)
            u, s, _ = torch.linalg.svd(w, full_matrices=False)
            keep = s > max(_DEPENDENCE, eps * p)
            if not bool(keep.any()):
                break  # the Krylov space is exhausted to working precision
            new = u[:, keep]  # (p, k), orthonormal, orthogonal to q
            if q.shape[1] + new.shape[1] > cfg.max_dim and q.shape[1] > 0:
                restarts += 1
                x0, r0 = x.clone(), r.clone()
                q, hq, t = q[:, :0], hq[:, :0], t[:0, :0]
                continue
            h_new = self.hvp(new)  # (p, k)
            hvps += new.shape[1]
            steps += 1
            cross = q.T @ h_new  # (d, k)
            corner = new.T @ h_new
            corner = 0.5 * (corner + corner.T)
            t = torch.cat([torch.cat([t, cross], 1), torch.cat([cross.T, corner], 1)], 0)
            q = torch.cat([q, new], 1)
            hq = torch.cat([hq, h_new], 1)
            rhs = q.T @ r0  # (d, m)
            factor, info = torch.linalg.cholesky_ex(t)
            y = torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.lstsq(t, rhs).solution
            x = x0 + q @ y
            r = r0 - hq @ y
            rel = r.norm(dim=0) / bnorm
        self.diagnostics = {
            "block_steps": steps,
            "hvps": hvps,
            "krylov_dim": int(q.shape[1]),
            "restarts": restarts,
            "max_relative_residual": float(rel.max()),
            "converged": bool((rel <= cfg.tol).all()),
        }
        return x.squeeze(1) if b.dim() == 1 else x
