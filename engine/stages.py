"""The stages of a build that compute something: θ̂, and the curvature that needs more than the
store (EK-FAC's factors). :mod:`engine.build` decides when each runs and where its result goes."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import BuildConfig, ModelKind
from .data import Dataset
from .distributed import Comm
from .grads.capture import capture
from .grads.layers import Selection, select_modules
from .grads.space import GradientSpace
from .ihvp.ekfac import (
    Batch,
    CovarianceAccumulator,
    DiagonalAccumulator,
    LayerBlock,
    capture_batches,
    fit_ekfac,
    layer_layout,
    rest_index,
    unprojected_layout,
)
from .ihvp.ekfac import (
    factors_to_tensors as ekfac_tensors,
)
from .models.objective import Objective
from .models.svm import hinge_kkt_residual, hinge_objective, train_hinge_svm
from .models.svm import to_flat as svm_to_flat
from .models.threads import intra_op_threads
from .models.train import (
    objective_value_and_grad,
    planned_epochs,
    stopping_rule,
    train_convex,
    train_network,
)

__all__ = ["EKFAC_CHUNK", "RowSource", "accuracy", "ekfac_factors", "ekfac_layout", "row_runs",
           "train_theta"]

EKFAC_CHUNK = 128  # training points per capture pass of the EK-FAC fit
ROW_BLOCK_BYTES = 64 << 20  # store rows per block of Λ's pass: this many bytes in float64


class RowSource(Protocol):
    """Store rows to read in blocks: ``shape`` (n, dim) and ``rows(slice)`` (b, dim) in the
    compute dtype (:class:`~engine.store.resident.ResidentStore`, or the build's memory map)."""

    @property
    def shape(self) -> tuple[int, ...] | torch.Size: ...

    def rows(self, index: slice) -> torch.Tensor: ...


def accuracy(obj: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
             chunk: int = 256, threads: int = 0) -> float:
    """Share of x (n, ...) predicted as y (n,), in chunks (no whole-split forward pass), with at
    most ``threads`` intra-op threads (0: half the cores, :mod:`engine.models.threads`)."""
    with torch.no_grad(), intra_op_threads(threads):
        right = sum(int((obj.logits(theta, x[s : s + chunk]).argmax(1) == y[s : s + chunk]).sum())
                    for s in range(0, len(x), chunk))
    return right / max(len(x), 1)


def row_runs(rows: np.ndarray, size: int) -> list[slice]:
    """Sorted row indices → contiguous slices of at most ``size`` rows."""
    out: list[slice] = []
    if rows.size == 0:
        return out
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for part in np.split(rows, breaks):
        for s in range(0, len(part), size):
            out.append(slice(int(part[s]), int(part[min(s + size, len(part)) - 1]) + 1))
    return out


def train_theta(config: BuildConfig, kind: ModelKind, obj: Objective, ds: Dataset, x: torch.Tensor,
                y: torch.Tensor, *, dev: torch.device, dtype: torch.dtype, progress: bool,
                user_grad_norm: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """θ̂ (p,) of every trainable parameter, and what training reports. A user model's θ̂ is
    given; its ‖∇R(θ̂)‖ takes a pass over x unless ``user_grad_norm`` is False (then
    ``grad_norm`` is None: the build takes it from the store's rows)."""
    lam = config.weight_decay
    if kind is ModelKind.USER:
        theta = obj.flat_params()
        if not user_grad_norm:
            return theta, {"trained": False, "grad_norm": None}
        # chunked like training: a whole-data pass of a large network (4,096 ResNet-18 images at
        # once) held 15 GB of activations just to report ‖∇R‖
        _, g = objective_value_and_grad(obj, theta, x, y, weight_decay=lam, chunk=config.train.batch_size)
        return theta, {"trained": False, "grad_norm": float(g.norm()), "grad_norm_from": "full-batch pass"}
    if kind is ModelKind.SVM:  # the true hinge (liblinear); influence uses the smooth hinge
        xs, ys = np.asarray(ds.x_train), np.asarray(ds.y_train)
        rows = train_hinge_svm(xs, ys, n_classes=ds.n_classes, weight_decay=lam, seed=config.seed)
        theta = torch.from_numpy(svm_to_flat(rows)).to(dev, dtype)
        _, g = objective_value_and_grad(obj, theta, x, y, weight_decay=lam)
        kkt = hinge_kkt_residual(rows, xs, ys, weight_decay=lam)
        return theta, {"trained": True, "loss": "hinge", "solver": "liblinear dual coordinate descent",
                       "grad_norm": kkt, "kkt_residual": kkt, "smooth_grad_norm": float(g.norm()),
                       "objective": hinge_objective(rows, xs, ys, weight_decay=lam)}
    if kind.convex:
        msgs: list[str] = []
        res = train_convex(obj, x, y, weight_decay=lam, log=msgs.append, config=config.train)
        return res.theta, {"trained": True, "grad_norm": res.grad_norm, "objective": res.objective,
                           "iterations": res.iterations, "log": msgs}
    tc = config.train
    with tqdm(total=planned_epochs(tc, len(x)), desc="train", unit="epoch", disable=not progress,
              file=sys.stderr) as bar, \
            tqdm(total=tc.lbfgs_steps if tc.polish_s > 0 else 0, desc="polish (L-BFGS)", unit="it",
                 disable=not progress or tc.polish_s <= 0, file=sys.stderr) as polish:
        res = train_network(obj, x, y, weight_decay=lam, config=tc, seed=config.seed,
                            epoch_bar=bar.update, polish_bar=polish.update)
    return res.theta, {"trained": True, "grad_norm": res.grad_norm, "objective": res.objective,
                       "iterations": res.iterations, "stopping": stopping_rule(tc, len(x))}


def ekfac_layout(space: GradientSpace) -> tuple[Selection, tuple[LayerBlock, ...]]:
    """The tracked layers and EK-FAC's blocks of them in the store's coordinates: one block per
    Kronecker layer (k_out, k_in) of a Kronecker store, one per layer group (d_out, d_in [+1])
    of a full one."""
    selection, kron = space.selection, space.kronecker
    if selection is None:
        selection = select_modules(space.objective.model, None)
    if kron is not None:
        return selection, layer_layout([(layer.name, *kron.factors(layer.name))
                                        for layer in selection.kronecker])
    return selection, unprojected_layout(selection.kronecker)


def ekfac_factors(space: GradientSpace, x: torch.Tensor, y: torch.Tensor, store: RowSource, *,
                  progress: bool, threads: int = 0,
                  covariances: CovarianceAccumulator | None = None,
                  captured: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                  comm: Comm | None = None) -> dict[str, torch.Tensor]:
    """EK-FAC's factors (as tensors, for ``curvature.pt``) of the tracked layers, in the store's
    space: the Kronecker-projected (ã, δ̃) of a Kronecker store, the raw (a, δ) per group of a
    full one. Store coordinates outside every layer block (exact modules' gradients) get the
    diagonal correction ``E_i[g_ij²]`` from the store rows. The covariances: ``covariances``
    when the store pass accumulated them over every sample, else one capture pass over x with at
    most ``threads`` intra-op threads (0: half the cores; on a loaded 2-core machine one thread
    captured 680–810 images/s, two 71–217). Λ from the store's rows (``store.rows(slice)`` in
    the compute dtype), which already hold each sample's G_i (or G̃_i), instead of a second pass
    through the model; for the layers in ``captured`` (the store pass's (a, δ) of layers with
    few positions) from those. ``comm``: x, y, ``store``, ``covariances`` and ``captured`` are
    this rank's samples only, every sum is summed over the ranks (:func:`fit_ekfac`), and every
    rank gets the factors of all the samples."""
    obj = space.objective
    selection, layout = ekfac_layout(space)
    dim = space.dim
    rest = rest_index(layout, dim)
    n = store.shape[0]
    diagonal = None
    if len(rest):
        acc = DiagonalAccumulator(rest)
        for start in range(0, n, 4096):
            acc.update(store.rows(slice(start, start + 4096)))
        if comm is not None:
            acc.all_reduce(comm)
        diagonal = acc.diagonal()
    x, y = x.to(obj.device, obj.dtype), y.to(obj.device)

    def batches() -> Iterator[Batch]:
        with tqdm(total=len(x), desc="ekfac covariances", unit="img", disable=not progress,
                  file=sys.stderr) as bar, space.hooks():
            for start in range(0, len(x), EKFAC_CHUNK):
                rows = slice(start, min(start + EKFAC_CHUNK, len(x)))
                yield from capture_batches(capture(obj.model, obj.loss_fn, x[rows], y[rows],
                                                   selection=selection, projector=space.kronecker))
                bar.update(rows.stop - rows.start)

    def store_rows() -> Iterator[torch.Tensor]:
        with tqdm(total=n, desc="ekfac eigenvalue correction", unit="img", disable=not progress,
                  file=sys.stderr) as bar:
            step = max(1, ROW_BLOCK_BYTES // (8 * max(dim, 1)))
            for start in range(0, n, step):
                block = store.rows(slice(start, min(start + step, n)))  # (b, dim)
                yield block.to(obj.device)
                bar.update(block.shape[0])

    with intra_op_threads(threads):
        factors = fit_ekfac(None if covariances is not None else batches, layout, dim=dim,
                            rest_diagonal=diagonal, rows=store_rows, covariances=covariances,
                            captured=captured if covariances is not None else None,
                            dtype=obj.dtype, device=obj.device, comm=comm)
    return ekfac_tensors(factors)
