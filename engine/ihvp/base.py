"""The one interface every inverse-Hessian-vector-product strategy implements."""

from __future__ import annotations

import threading
from typing import Any, Protocol

import torch

from ..config import IHVPMethod

__all__ = ["Solver", "ThreadDiagnostics"]


class Solver(Protocol):
    """``solve(B)`` returns ``H⁻¹B`` for B (d, m) in the store's space (d = p, or K if projected).

    ``settings()`` describes the solver; ``diagnostics`` describes the last solve (residuals,
    iterations, convergence). Both are JSON-serialisable and reported with the scores.
    """

    method: IHVPMethod
    diagnostics: dict[str, Any]

    def solve(self, b: torch.Tensor) -> torch.Tensor: ...

    def settings(self) -> dict[str, Any]: ...


class ThreadDiagnostics:
    """``diagnostics`` of the last solve made by the calling thread (else by any thread): a web
    server solves on many threads with one solver, and a response must report its own solve's
    residual, not that of whichever query finished last."""

    def __init__(self) -> None:
        self._diag_local = threading.local()
        self._diag_last: dict[str, Any] = {}

    @property
    def diagnostics(self) -> dict[str, Any]:
        return getattr(self._diag_local, "value", self._diag_last)

    @diagnostics.setter
    def diagnostics(self, value: dict[str, Any]) -> None:
        self._diag_local.value = value
        self._diag_last = value
