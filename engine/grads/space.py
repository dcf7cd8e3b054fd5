"""The space the gradient store lives in, and how a store row is computed from a sample.

Three kinds (``--projection`` with ``--project K``):

- ``full``: rows are ``∇θ L(z_i, θ̂)`` (p,), by ``vmap(grad)`` (:mod:`engine.grads.per_sample`);
- ``dense``: rows are ``(∇θ L) P`` (K,) for one seeded Gaussian P (p, K)
  (:mod:`engine.grads.projection`), the reference projection;
- ``kronecker``: rows are ``vec(P_outᵀ G_l P_in)`` per tracked Linear/Conv2d layer l, then the
  exact modules' block, computed from each layer's inputs and output gradients without forming
  the per-sample gradient (:mod:`engine.grads.kronecker`, LoGra).

Test points and uploads are mapped by the same :meth:`GradientSpace.rows`, so every query works
unchanged whatever the kind. The manifest's ``projection`` entry records the kind, K, the seed
and, for ``kronecker``, the split per layer; :func:`space_from_manifest` rebuilds the same space.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

import torch

from ..errors import ModelError
from ..models.objective import Objective
from .chunks import Sink
from .kronecker import KroneckerProjector
from .layers import Selection, select_modules
from .layerwise import Captures, gradient_energy, layerwise_grads
from .per_sample import per_sample_grads
from .projection import Projector

__all__ = ["CALIBRATION_SAMPLES", "GradientSpace", "ProjectionKind", "make_space", "space_from_manifest"]

CALIBRATION_SAMPLES = 64  # training points whose gradient energy weights the Kronecker split


class ProjectionKind(str, Enum):
    """How store rows are projected."""

    DENSE = "dense"  # one seeded Gaussian P (p, K)
    KRONECKER = "kronecker"  # per layer P_outᵀ G P_in


class GradientSpace:
    """Computes store rows (b, d) for samples (x, y) at the objective's θ̂."""

    def __init__(self, objective: Objective, theta: torch.Tensor, *,
                 projector: Projector | None = None, kronecker: KroneckerProjector | None = None,
                 selection: Selection | None = None) -> None:
        self.objective, self.theta = objective, theta
        self.projector, self.kronecker, self.selection = projector, kronecker, selection
        # hooks go on the shared module for the layer-wise path: one thread at a time
        self._lock = threading.Lock()

    def hooks(self) -> threading.Lock:
        """Held while hooks are on the shared module (a context manager)."""
        return self._lock

    @property
    def kind(self) -> str:
        return "kronecker" if self.kronecker else ("dense" if self.projector else "full")

    @property
    def dim(self) -> int:
        if self.kronecker is not None:
            return self.kronecker.k
        return self.projector.k if self.projector is not None else self.objective.n_params

    @property
    def projected(self) -> bool:
        return self.kind != "full"

    def rows(self, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 512, sink: Sink | None = None,
             progress: Callable[[int], None] | None = None,
             on_captures: Callable[[slice, Captures], None] | None = None) -> torch.Tensor | None:
        """Store rows (b, d) of the data-loss gradients of x (b, *input_shape), y (b,) (or each
        chunk handed to ``sink``). ``on_captures``: the Kronecker path's per-chunk projected
        layer inputs and output gradients (for EK-FAC's factors)."""
        obj = self.objective
        x, y = x.to(obj.device, obj.dtype), y.to(obj.device)
        if self.kronecker is None:
            if on_captures is not None:
                raise ValueError("layer captures exist only on the Kronecker path")
            return per_sample_grads(obj, self.theta, x, y, chunk_size=chunk, projector=self.projector,
                                    sink=sink, progress=progress)
        assert self.selection is not None
        with self._lock:
            return layerwise_grads(obj.model, obj.loss_fn, x, y, selection=self.selection,
                                   projector=self.kronecker, chunk=min(chunk, 256), sink=sink,
                                   progress=progress, on_captures=on_captures)

    def describe(self) -> dict[str, Any] | None:
        """The manifest's ``projection`` entry (None for full gradients)."""
        if self.kronecker is not None:
            return {"kind": ProjectionKind.KRONECKER.value, "k": self.kronecker.k,
                    "seed": self.kronecker.seed, "basis": self.kronecker.basis,
                    "split": self.kronecker.split(),
                    "params": None if self.selection is None or self.selection.patterns is None
                    else ",".join(self.selection.patterns)}
        if self.projector is not None:
            return {"kind": ProjectionKind.DENSE.value, "k": self.projector.k, "seed": self.projector.seed}
        return None


def make_space(objective: Objective, theta: torch.Tensor, *, projection: str, k: int | None, seed: int,
               params: str | None, x: torch.Tensor, y: torch.Tensor) -> GradientSpace:
    """The space a new store is written in. For ``kronecker`` the split of K over the layers is
    weighted by each layer's mean squared gradient on the first ``CALIBRATION_SAMPLES`` of x."""
    if not k:
        return GradientSpace(objective, theta)
    if ProjectionKind(projection) is ProjectionKind.DENSE:
        return GradientSpace(objective, theta, projector=Projector(
            objective.n_params, k, seed=seed, dtype=objective.dtype, device=objective.device))
    if not objective.functional:
        raise ModelError("--projection kronecker needs an nn.Module (hooks); a TorchScript model "
                         "can use --projection dense")
    selection = select_modules(objective.model, params)
    xs, ys = x[:CALIBRATION_SAMPLES].to(objective.device, objective.dtype), y[:CALIBRATION_SAMPLES]
    weights = gradient_energy(objective.model, objective.loss_fn, xs, ys.to(objective.device),
                              selection=selection)
    kron = KroneckerProjector(selection, k, seed=seed, dtype=objective.dtype,
                              device=objective.device, weights=weights)
    return GradientSpace(objective, theta, kronecker=kron, selection=selection)


def space_from_manifest(objective: Objective, theta: torch.Tensor,
                        projection: Mapping[str, Any] | None,
                        bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> GradientSpace:
    """The space a store was written in, from its manifest's ``projection`` entry (and, for
    Kronecker PCA bases, the saved ``bases``)."""
    if not projection:
        return GradientSpace(objective, theta)
    if projection.get("kind", ProjectionKind.DENSE.value) == ProjectionKind.DENSE.value:
        return GradientSpace(objective, theta, projector=Projector(
            objective.n_params, int(projection["k"]), seed=int(projection["seed"]),
            dtype=objective.dtype, device=objective.device))
    selection = select_modules(objective.model, projection.get("params"))
    kron = KroneckerProjector.from_split(selection, projection["split"], dtype=objective.dtype,
                                         device=objective.device, bases=bases)
    return GradientSpace(objective, theta, kronecker=kron, selection=selection)
