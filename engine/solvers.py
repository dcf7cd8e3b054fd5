"""A run's inverse-Hessian solvers, built on first use and kept: one per (method, damping).

The solver for ``H + δ'·I`` is named by the IHVP method and a damping δ' (None: the run's own
δ). Building one can be expensive (a dense Hessian, CG's priming, LiSSA's scale estimate), so
each key has its own lock: concurrent first queries build it once, and queries for other keys
are not held up.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import torch

from .config import BuildConfig, IHVPMethod
from .errors import QueryError
from .ihvp import (
    BlockCG,
    ExactSolver,
    Lissa,
    ProjectedSolver,
    Solver,
    batch_hvp,
    full_hessian,
    full_hvp,
    largest_eigenvalue,
)
from .ihvp.base import Solution
from .ihvp.ekfac import factors_from_tensors
from .ihvp.ekfac_solver import EKFACSolver
from .ihvp.fisher import FisherSolver
from .parts import DataTensors, GradientStore, LoadedModel
from .runinfo import RunInfo

__all__ = ["InputDtype", "SolverBank", "lissa_scale", "parse_method"]

logger = logging.getLogger(__name__)

SolverKey = tuple[IHVPMethod, float | None]


def parse_method(name: str | IHVPMethod | None) -> IHVPMethod | None:
    """An IHVP method by name (None stays None: the run's own); a clear error for unknown names."""
    if name is None or isinstance(name, IHVPMethod):
        return name
    try:
        return IHVPMethod(name)
    except ValueError:
        raise QueryError(
            f"unknown ihvp method {name!r}: use one of {', '.join(m.value for m in IHVPMethod)}"
        ) from None


class SolverBank:
    """Builds and keeps the solvers of one run."""

    def __init__(self, info: RunInfo, model: LoadedModel, data: DataTensors, store: GradientStore,
                 curvature: dict[str, torch.Tensor]) -> None:
        self.info = info
        self.config: BuildConfig = info.config
        self.model, self.data, self.store = model, data, store
        self._curvature = curvature
        self._solvers: dict[SolverKey, Solver] = {}
        self._locks: dict[SolverKey, threading.Lock] = {}
        self._lock = threading.Lock()  # bookkeeping of the two dictionaries only

    def key(self, method: str | IHVPMethod | None, damping: float | None = None) -> SolverKey:
        """(method, damping) naming a solver: None is the run's own method / δ."""
        m = parse_method(method) or self.config.ihvp
        if damping is not None and (not np.isfinite(damping) or damping < 0):
            raise QueryError(f"damping must be a finite number ≥ 0, got {damping!r}")
        return m, None if damping is None or damping == self.config.damping else float(damping)

    def get(self, method: str | IHVPMethod | None = None, *, damping: float | None = None) -> Solver:
        """The solver for ``method`` (default: the run's) and ``H + damping·I`` (default: δ)."""
        key = self.key(method, damping)
        solver = self._solvers.get(key)
        if solver is not None:
            return solver
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            solver = self._solvers.get(key)
            if solver is None:
                t = time.perf_counter()
                solver = self._make(*key)
                logger.info("built the %s solver (damping %s) in %.2f s", key[0].value,
                            "the run's" if key[1] is None else key[1], time.perf_counter() - t)
                with self._lock:
                    self._solvers[key] = solver
        return solver

    def report(self, method: str | IHVPMethod | None = None,
               diagnostics: dict[str, Any] | None = None) -> dict[str, Any]:
        """``{"method", "settings", "diagnostics"}`` of a solver; diagnostics of one solve, or
        without one, those every solve shares (the exact solver's probed residual) or none."""
        s = self.get(method)
        if diagnostics is None:
            diagnostics = getattr(s, "diagnostics", {})
        return {"method": s.method.value, "settings": s.settings(), "diagnostics": dict(diagnostics)}

    def available(self) -> list[IHVPMethod]:
        """The IHVP methods a query may ask for on this run (what its store and curvature allow)."""
        if self.store.projected:
            out = [IHVPMethod.FISHER]
            if "projected" in self._curvature:
                out.insert(0, IHVPMethod.PROJECTED)
        else:
            out = [IHVPMethod.EXACT, IHVPMethod.CG, IHVPMethod.LISSA, IHVPMethod.FISHER]
        if "dim" in self._curvature:  # EK-FAC factors
            out.append(IHVPMethod.EKFAC)
        return out

    def _make(self, m: IHVPMethod, damping: float | None) -> Solver:
        if m not in self.available():
            kind = self.store.space.kind
            raise QueryError(
                f"ihvp {m.value!r} cannot be used with this run ({kind} gradients"
                + ("" if kind == "full" else f", projected to {self.store.space.dim}")
                + f"); use one of {', '.join(x.value for x in self.available())}"
                + (" (build with --project K to use 'projected')" if m is IHVPMethod.PROJECTED
                   and not self.store.projected else "")
                + (" (build with --ihvp ekfac for EK-FAC factors)" if m is IHVPMethod.EKFAC else ""))
        if damping is not None and self.store.projected and m is IHVPMethod.PROJECTED:
            raise QueryError("a damping other than the run's needs full gradients; this run is projected")
        cfg = self.config
        shift = cfg.weight_decay + (cfg.damping if damping is None else damping)
        obj, theta, x, y = self.model.objective, self.model.theta, self.data.x_train, self.data.y_train
        if m is IHVPMethod.PROJECTED:
            return ProjectedSolver(self._curvature["projected"].to(self.model.device, self.model.dtype))
        extra = cfg.damping if damping is None else damping
        if m is IHVPMethod.FISHER:
            return InputDtype(FisherSolver(self.store.resident, weight_decay=cfg.weight_decay,
                                           damping=extra, device=self.model.device))
        if m is IHVPMethod.EKFAC:
            return InputDtype(EKFACSolver(factors_from_tensors(self._curvature),
                                          weight_decay=cfg.weight_decay, damping=extra,
                                          device=self.model.device))
        if m is IHVPMethod.EXACT:
            h = self._curvature.get("hessian")  # built with the run's own λ + δ
            if h is None:
                h = full_hessian(obj, theta, x, y, shift=shift)
            elif damping is not None:
                h = h + (damping - cfg.damping) * torch.eye(h.shape[0], dtype=h.dtype)
            return ExactSolver(h.to(self.model.device, self.model.dtype))
        if m is IHVPMethod.CG:
            return BlockCG(full_hvp(obj, theta, x, y, shift=shift), cfg.cg)
        lissa = cfg.lissa
        scale = lissa.scale or self.info.curvature.get("lissa_scale")
        if scale is None:
            scale = lissa_scale(full_hvp(obj, theta, x, y, shift=shift), n_params=obj.n_params,
                                config=cfg, dtype=self.model.dtype, device=self.model.device)
        return Lissa(batch_hvp(obj, theta, x, y, shift=shift), n_train=len(y), config=lissa, scale=scale,
                     # λ+δ bounds H's spectrum from below only when the data loss is convex
                     min_eigenvalue_bound=shift if self.info.model.convex else 0.0)


class InputDtype:
    """A solver that computes in float64 (Fisher, EK-FAC) answering in its input's dtype, so that
    its answer multiplies a float32 run's gradients like every other solver's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.method: IHVPMethod = inner.method

    @property
    def diagnostics(self) -> dict[str, Any]:
        return self.inner.diagnostics

    def settings(self) -> dict[str, Any]:
        return self.inner.settings()

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        return self.inner.solve(b).to(b.dtype)

    def solve_report(self, b: torch.Tensor) -> Solution:
        sol = self.inner.solve_report(b)
        return Solution(sol.x.to(b.dtype), sol.diagnostics)


def lissa_scale(hvp: Any, *, n_params: int, config: BuildConfig, dtype: torch.dtype,
                device: torch.device) -> float:
    """LiSSA's scale: ``scale_margin`` × the power-iteration estimate of H's top eigenvalue."""
    lissa = config.lissa
    return lissa.scale_margin * largest_eigenvalue(hvp, n_params, dtype=dtype, device=device,
                                                   iters=lissa.power_iters, seed=lissa.seed)
