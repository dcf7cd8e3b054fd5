"""The one interface every inverse-Hessian-vector-product strategy implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..config import IHVPMethod

__all__ = ["Solution", "Solver"]


@dataclass(frozen=True)
class Solution:
    """One solve's answer ``x = H⁻¹B`` (same shape as B) and its own diagnostics (residuals,
    iterations, convergence; JSON-serialisable). Returned by :meth:`Solver.solve_report`, so a
    caller on any thread reports the diagnostics of its own solve."""

    x: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)


class Solver(Protocol):
    """``solve(B)`` returns ``H⁻¹B`` for B (d,) or (d, m) in the store's space (d = p, or K if
    projected); ``solve_report(B)`` returns the same as a :class:`Solution` with that solve's
    diagnostics. ``settings()`` describes the solver (JSON-serialisable, reported with the scores).
    """

    method: IHVPMethod

    def solve(self, b: torch.Tensor) -> torch.Tensor: ...

    def solve_report(self, b: torch.Tensor) -> Solution: ...

    def settings(self) -> dict[str, Any]: ...
