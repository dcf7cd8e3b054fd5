"""The build's store stage: this process's per-sample gradients into the store, and what the
same pass can gather on the way.

A build that fits EK-FAC needs the tracked layers' covariances ``A = E[a aᵀ]``, ``S = E[δ δᵀ]``,
which are the same layer inputs and output gradients the layer-wise path computes the rows from;
a user model's ``‖∇R(θ̂)‖`` is ``‖(1/n) Σ_i g_i + λθ̂‖`` of the very rows a full store holds. So
when one process writes every row in one go (not resumed half-way, not distributed), the store
pass accumulates them (:class:`PassGather`) and the build skips the separate capture pass and
the full-batch gradient pass. A full store written for EK-FAC takes its rows from the layer-wise
capture (``G_i = Σ_s δ_s a_sᵀ``, equal to ``vmap(grad)``'s to rounding) when every trainable
parameter belongs to a tracked module, in ``named_parameters()`` order; otherwise, and whenever
the pass did not see every row, the build falls back to the separate passes (same results).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .distributed import Comm
from .errors import ModelError
from .grads.capture import Captures
from .grads.layers import Selection, select_modules
from .grads.layerwise import layerwise_grads
from .grads.pca import BASES_FILE, SAMPLES_KEY, bases_from_tensors, bases_to_tensors, pca_bases
from .grads.space import GradientSpace
from .ihvp.ekfac import CovarianceAccumulator, capture_batches
from .models.objective import Objective
from .models.threads import intra_op_threads
from .models.train import objective_value_and_grad
from .stages import ekfac_layout, row_runs
from .store.files import load_tensors, save_tensors
from .store.gradients import GRADS_FILE, MANIFEST_FILE, TORCH_DTYPES, StoreWriter, as_torch, open_store
from .store.resident import ResidentStore

__all__ = ["MappedRows", "PassGather", "full_selection", "kronecker_bases", "user_grad_norm", "write_store"]


@dataclass
class PassGather:
    """What the store pass accumulates besides the rows: EK-FAC's covariances (``covariances``,
    when asked for), ``row_sum`` Σ_i g_i (dim,) float64 of the rows as computed (before the
    store's dtype rounds them), over ``seen`` rows, and ``resident``, the store's rows as the
    file holds them from row ``offset`` on (so neither EK-FAC's Λ nor the returned run reads back
    the file just written: on this machine a first read of a 364 MB store right after writing it
    took 0.5–1.1 s; in a distributed build, a rank's own rows)."""

    covariances: CovarianceAccumulator | None = None
    row_sum: torch.Tensor | None = None
    seen: int = 0
    resident: ResidentStore | None = field(default=None, repr=False)
    offset: int = 0

    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict, repr=False)

    def on_captures(self, _rows: slice, caps: Captures) -> None:
        """Add a chunk's captures to the covariances; keep those of layers with few positions
        for Λ (:func:`~engine.ihvp.ekfac.fit_ekfac`'s ``captured``): at most a quarter of the
        layer's gradient size, so Λ costs d_in² + d_out² a sample instead of d_out·d_in²."""
        assert self.covariances is not None
        for name, a, delta in capture_batches(caps):
            self.covariances.update(name, a, delta)
            positions = a.shape[1] if a.dim() == 3 else 1
            d_in, d_out = a.shape[-1], delta.shape[-1]
            if 4 * positions * (d_in + d_out) <= d_in * d_out:
                self.captured.setdefault(name, []).append((a.detach().clone(), delta.detach().clone()))

    def on_rows(self, rows: slice, block: torch.Tensor) -> None:
        """Add the block of rows ``rows`` (b, dim)."""
        if self.resident is not None:
            data = self.resident.data  # (rows kept, dim) in the store's dtype
            data[rows.start - self.offset : rows.stop - self.offset] = block.detach().to(
                device=data.device, dtype=data.dtype)
        if self.row_sum is not None:
            self.row_sum += block.detach().to(torch.float64).sum(0).cpu()  # (dim,)
        self.seen += block.shape[0]


def full_selection(space: GradientSpace) -> Selection | None:
    """The layer-wise selection whose exact per-sample gradients are a full store's rows (every
    trainable parameter in a tracked module, in ``named_parameters()`` order), or None."""
    obj = space.objective
    if space.kind != "full" or not obj.functional:
        return None
    try:
        selection = select_modules(obj.model, None)
    except ModelError:
        return None
    return selection if list(selection.param_names) == list(obj.names) else None


class MappedRows:
    """A finished store's rows read from its memory map a block at a time (no resident copy),
    in the compute dtype: the rows a :class:`~engine.store.resident.ResidentStore` would give."""

    def __init__(self, folder: Path, *, expect: dict[str, Any], compute_dtype: torch.dtype,
                 device: torch.device) -> None:
        self.array, manifest = open_store(folder, expect=expect)
        self.dtype = str(manifest["dtype"])
        self.compute_dtype, self.device = compute_dtype, device

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def rows(self, index: slice) -> torch.Tensor:
        """Rows (b, dim) of ``index``."""
        return as_torch(self.array[index], self.dtype).to(self.device, self.compute_dtype)


def write_store(folder: Path, space: GradientSpace, x: torch.Tensor, y: torch.Tensor, *,
                mine: slice, n: int, store_dtype: str, chunk: int, threads: int, comm: Comm,
                progress: bool, extra: dict[str, Any], covariances: bool, row_sum: bool,
                resident: bool) -> PassGather | None:
    """Rows ``mine`` of the store in ``folder`` (x, y: those rows), only those not yet written;
    rank 0 writes the manifest with ``extra`` once every rank's rows are in. Returns what the
    pass gathered when this process wrote all its rows (``mine``) in this call: ``covariances``,
    EK-FAC's over those rows, and ``resident``, the rows in memory (``resident``: when this one
    process wrote every row of the store; ``covariances`` in a distributed build: this rank's
    rows), and when this one process wrote every row, ``row_sum`` (Σ g_i); None otherwise (the
    caller then makes the separate passes and reads the file)."""
    dim = space.dim
    if (folder / GRADS_FILE).is_file():  # renamed only once every row was in
        if comm.is_root and not (folder / MANIFEST_FILE).is_file():
            # killed between the rename and the manifest: the rows are complete, write the manifest
            StoreWriter.write_manifest(folder, n=n, dim=dim, dtype=store_dtype, extra=extra)
        return None
    writer = StoreWriter(folder, n=n, dim=dim, dtype=store_dtype, resume=True) if comm.is_root else None
    comm.barrier()  # rank 0 has created (or reopened) the files
    if writer is None:
        writer = StoreWriter(folder, n=n, dim=dim, dtype=store_dtype, create=False)
    todo = writer.missing(mine)
    gather = PassGather() if len(todo) == mine.stop - mine.start else None  # every row of this rank
    alone = comm.world == 1  # this process writes every row of the store
    obj = space.objective
    if gather is not None and row_sum and alone:
        gather.row_sum = torch.zeros(dim, dtype=torch.float64)
    layerwise = None
    if gather is not None and covariances:
        if space.kind == "full":
            layerwise = full_selection(space)
        if space.kind == "kronecker" or layerwise is not None:
            gather.covariances = CovarianceAccumulator(ekfac_layout(space)[1], dtype=obj.dtype,
                                                       device=obj.device)
    if gather is not None and (resident and alone or gather.covariances is not None and not alone):
        # the whole store for the returned run, or this rank's rows for EK-FAC's Λ
        gather.resident = ResidentStore(torch.empty((mine.stop - mine.start, dim), dtype=TORCH_DTYPES[store_dtype],
                                                    device=obj.device), compute_dtype=obj.dtype)
        gather.offset = mine.start
    with tqdm(total=mine.stop - mine.start, initial=mine.stop - mine.start - len(todo), desc="gradients",
              unit="img", disable=not progress, file=sys.stderr) as bar, intra_op_threads(threads):
        for rows in row_runs(todo, chunk):
            local = slice(rows.start - mine.start, rows.stop - mine.start)

            def sink(part: slice, block: torch.Tensor, base: int = rows.start) -> None:
                where = slice(base + part.start, base + part.stop)
                writer.write(where, block)
                if gather is not None:
                    gather.on_rows(where, block)

            hook = gather.on_captures if gather is not None and gather.covariances is not None else None
            if layerwise is not None:
                with space.hooks():
                    layerwise_grads(obj.model, obj.loss_fn, x[local].to(obj.device, obj.dtype),
                                    y[local].to(obj.device), selection=layerwise, chunk=min(chunk, 256),
                                    sink=sink, progress=bar.update, on_captures=hook)
            else:
                space.rows(x[local], y[local], chunk=chunk, sink=sink, progress=bar.update,
                           on_captures=hook)
    if not comm.is_root:
        writer.close()  # flags this rank's rows done (synced) before rank 0 counts them
    comm.barrier()  # every rank's rows are in, and flagged
    if comm.is_root:
        writer.finish(extra)
    return gather


def user_grad_norm(obj_all: Objective, theta_all: torch.Tensor, gather: PassGather | None, *,
                   full: bool, n: int, weight_decay: float, x: torch.Tensor, y: torch.Tensor,
                   batch: int) -> tuple[float, str]:
    """‖∇R(θ̂)‖ of a user model and how it was had: ``(1/n) Σ_i g_i + λθ̂`` from the store pass's
    row sum when the store is ``full`` (every parameter, unprojected) and the pass saw all n
    rows, else a chunked full-batch pass over x, y."""
    if full and gather is not None and gather.row_sum is not None:
        g = gather.row_sum / n + weight_decay * theta_all.detach().to(torch.float64).cpu()  # (p,)
        return float(g.norm()), "store rows"
    _, g = objective_value_and_grad(obj_all, theta_all, x, y, weight_decay=weight_decay, chunk=batch)
    return float(g.norm()), "full-batch pass"


def kronecker_bases(folder: Path, space: GradientSpace, x: torch.Tensor, y: torch.Tensor, *,
                    comm: Comm, threads: int, progress: bool) -> None:
    """Give ``space``'s Kronecker projector the data-aware (pca) bases of
    :mod:`engine.grads.pca` from x, y (the first PCA_SAMPLES training points, the same on every
    rank): read from ``folder``'s bases file when an interrupted build saved them, else computed
    (every rank takes rank 0's) and saved there by rank 0 before any row is written."""
    kron = space.kronecker
    assert kron is not None
    path = folder / BASES_FILE
    if path.is_file():
        saved = load_tensors(path)
        kron.set_bases(bases_from_tensors(saved))
        kron.basis_samples = int(saved[SAMPLES_KEY]) if SAMPLES_KEY in saved else None
        return
    obj = space.objective
    with space.hooks(), intra_op_threads(threads), tqdm(
            total=len(x), desc="kronecker bases (pca)", unit="img", disable=not progress, file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        bases = pca_bases(obj.model, obj.loss_fn, x.to(obj.device, obj.dtype), y.to(obj.device), projector=kron,
                          progress=progress)
    bases = {name: (comm.broadcast(p_out.contiguous()), comm.broadcast(p_in.contiguous()))
             for name, (p_out, p_in) in bases.items()}
    kron.set_bases(bases)
    if comm.is_root:
        save_tensors(path, bases_to_tensors(bases, samples=kron.basis_samples))
    comm.barrier()
