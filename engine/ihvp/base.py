"""The one interface every inverse-Hessian-vector-product strategy implements."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..config import IHVPMethod

__all__ = ["Solver"]


class Solver(Protocol):
    """``solve(B)`` returns ``H⁻¹B`` for B (d, m) in the store's space (d = p, or K if projected).

    ``settings()`` describes the solver; ``diagnostics`` describes the last solve (residuals,
    iterations, convergence). Both are JSON-serialisable and reported with the scores.
    """

    method: IHVPMethod
    diagnostics: dict[str, Any]

    def solve(self, b: torch.Tensor) -> torch.Tensor: ...

    def settings(self) -> dict[str, Any]: ...
