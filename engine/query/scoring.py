"""Influence scores from the store: ``I_up,loss(z_i, z_test) = −∇L(z_test)ᵀ H⁻¹ ∇L(z_i)``.

Positive is harmful, negative helpful; removing z_i changes the test loss by about ``−I/n``.
:class:`Scorer` answers every query of a run: test and input gradients in the store's space,
scores for gradients, self-influence, one training point's influence on every test point,
influence on parameters, and the top-k helpful and harmful points in one pass over the store.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..cache import BoundedCache
from ..config import IHVPMethod
from ..errors import IndexOutOfRange, QueryError
from ..ihvp import ExactSolver
from ..parts import DataTensors, GradientStore, LoadedModel
from ..results import TopInfluences
from ..solvers import SolverBank
from .topk import helpful_harmful

__all__ = ["PRECONDITIONED_MAX_BYTES", "Scorer", "check_indices"]

PRECONDITIONED_MAX_BYTES = 1 << 30  # an exact run keeps −G H⁻¹ beside a store up to this size
SELF_BLOCK = 4096  # training rows per self-influence solve


def check_indices(index: int | Sequence[int] | np.ndarray | None, n: int, what: str) -> np.ndarray:
    """Indices into a split of n points as int64 (m,); None is all of them. Refuses non-integers
    (:class:`QueryError`) and out-of-range ids (:class:`IndexOutOfRange`)."""
    if index is None:
        return np.arange(n)
    arr = np.atleast_1d(np.asarray(index))
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise QueryError(f"{what} index must be integers, got {index!r}")
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise IndexOutOfRange(f"{what} index {int(bad[0])} is out of range 0..{n - 1}")
    return arr.astype(np.int64)


class Scorer:
    """The queries of one run over its model, data, store, solvers and cache."""

    def __init__(self, model: LoadedModel, data: DataTensors, store: GradientStore,
                 solvers: SolverBank, cache: BoundedCache) -> None:
        self.model, self.data, self.store = model, data, store
        self.solvers, self.cache = solvers, cache
        self.n_train = len(data.y_train)
        self._precond: torch.Tensor | None = None  # −G H⁻¹, see preconditioned()
        self._precond_checked = False
        self._exact_columns = 0  # columns the run's own exact solver has scored
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ gradients
    def test_gradients(self, test_index: np.ndarray | Sequence[int], *, chunk: int = 512) -> torch.Tensor:
        """(m, d) data-loss gradients of test points, in the store's space."""
        idx = torch.as_tensor(np.asarray(test_index), device=self.model.device)
        return self.input_gradients(self.data.x_test[idx], self.data.y_test[idx], chunk=chunk)

    def input_gradients(self, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 512) -> torch.Tensor:
        """(b, d) gradients for arbitrary inputs (b, *input_shape) with labels y (b,)."""
        g = self.store.space.rows(x, y, chunk=chunk)
        assert g is not None  # no sink: the gradients are returned
        return g

    def all_test_gradients(self) -> torch.Tensor:
        """(n_test, d) gradients of every test point in the store's space, computed once."""
        return self.cache.get(("test-grads",), lambda: self.test_gradients(np.arange(len(self.data.y_test))))

    # ------------------------------------------------------------------ scores
    def preconditioned(self) -> torch.Tensor | None:
        """``−G H⁻¹`` (n, d) for the run's own exact curvature, or None where it is not kept.

        With it a query for test gradients T (m, d) is one product ``(−G H⁻¹) Tᵀ`` instead of a
        solve and a pass over the store (the same scores to rounding). Kept only for an exact run
        whose store is in the compute dtype and at most ``PRECONDITIONED_MAX_BYTES``.
        """
        if self._precond_checked:
            return self._precond
        with self._lock:
            if not self._precond_checked:
                solver = (self.solvers.get(IHVPMethod.EXACT)
                          if self.solvers.config.ihvp is IHVPMethod.EXACT else None)
                res = self.store.resident
                if (isinstance(solver, ExactSolver) and not self.store.projected
                        and res.dtype == self.model.dtype and res.nbytes <= PRECONDITIONED_MAX_BYTES):
                    self._precond = solver.solve(res.data.T.contiguous()).neg_().T  # (n, d)
                self._precond_checked = True
        return self._precond

    def scores_for_gradients(self, g: torch.Tensor, ihvp: str | IHVPMethod | None = None, *,
                             damping: float | None = None) -> torch.Tensor:
        """I_up,loss (n_train, m) for test gradients g (m, d).

        With the run's own exact solver, the first queries solve ``H⁻¹gᵀ``; once they have asked
        for n_train columns in all, the :meth:`preconditioned` store is made (about the cost of
        n_train columns, so a run queried once never pays for it and one queried often pays at
        most twice the cheaper choice) and each query after that is one product.
        """
        return self.scores_report(g, ihvp, damping=damping)[0]

    def scores_report(self, g: torch.Tensor, ihvp: str | IHVPMethod | None = None, *,
                      damping: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`scores_for_gradients` (n_train, m) and the solve's diagnostics (empty when
        the preconditioned store answered without a solve)."""
        solver = self.solvers.get(ihvp, damping=damping)
        if self.solvers.key(ihvp, damping) == (IHVPMethod.EXACT, None):
            with self._lock:
                self._exact_columns += g.shape[0]
                ready = self._precond_checked or self._exact_columns >= self.n_train
            a = self.preconditioned() if ready else None
            if a is not None:
                return a @ g.T.to(a.dtype), {}  # (n, m): one product
        solution = solver.solve_report(g.T.contiguous())  # (d, m) = H⁻¹ ∇L(z_test)
        blocks = [prod.neg_() for _, prod in self.store.resident.products(solution.x)]  # (b, m) each
        return (blocks[0] if len(blocks) == 1 else torch.cat(blocks)), solution.diagnostics

    def self_influence(self, ihvp: str | IHVPMethod | None = None) -> np.ndarray:
        """``−g_iᵀ H⁻¹ g_i`` for every training point, float64 (n_train,), cached per method."""
        solver = self.solvers.get(ihvp)

        def compute() -> np.ndarray:
            out = []
            for start in range(0, self.n_train, SELF_BLOCK):
                g = self.store.resident.rows(slice(start, start + SELF_BLOCK))  # (b, d)
                out.append(-(g * solver.solve(g.T.contiguous()).T).sum(dim=1))  # (b,)
            return torch.cat(out).cpu().double().numpy()

        return self.cache.get(("self", solver.method.value), compute)

    def train_influence(self, train_index: int, ihvp: str | IHVPMethod | None = None) -> np.ndarray:
        """Row ``train_index`` of the scores (n_test,) float64, with one solve."""
        i = int(check_indices(train_index, self.n_train, "train")[0])
        s = self.solvers.get(ihvp).solve(self.store.resident.rows(slice(i, i + 1)).T.contiguous())  # (d, 1)
        return (-(self.all_test_gradients() @ s)[:, 0]).cpu().double().numpy()

    def params(self, train_index: int, ihvp: str | IHVPMethod | None = None) -> np.ndarray:
        """``I_up,params(z_i) = −H⁻¹ ∇L(z_i)``, float64 (p,) in ``named_parameters()`` order."""
        if self.store.projected:
            raise QueryError("influence on parameters needs full gradients; this run is projected")
        i = int(check_indices(train_index, self.n_train, "train")[0])
        return (-self.solvers.get(ihvp).solve(self.store.resident.rows(slice(i, i + 1))[0])).cpu().double().numpy()

    # ------------------------------------------------------------------ top-k
    def topk_scores(self, s: torch.Tensor, k: int
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Helpful and harmful top-k of ``scores = −G s`` for s (d, m), in one pass over the store
        (one product per block feeds both running top-k; the score matrix is never formed).
        Returns ``((values, ids), (values, ids))``, each (k, m)."""
        return helpful_harmful(self.store.resident.products_t(s.T.contiguous()), k)

    def top_influences(self, g: torch.Tensor, *, top: int, ihvp: str | IHVPMethod | None = None
                       ) -> TopInfluences:
        """The top-``top`` helpful and harmful training points of each column of g (m, d)."""
        if top < 1:
            raise QueryError(f"top must be at least 1, got {top}")
        solution = self.solvers.get(ihvp).solve_report(g.T.contiguous())  # (d, m)
        (hv, hi), (av, ai) = self.topk_scores(solution.x, top)
        hv, hi, av, ai = (t.cpu().numpy() for t in (hv, hi, av, ai))  # one copy each from the device
        return TopInfluences(hi.astype(np.int64), hv.astype(np.float64), ai.astype(np.int64),
                             av.astype(np.float64), solution.diagnostics)
