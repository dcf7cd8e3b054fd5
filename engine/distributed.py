"""The gradient build over several processes with ``torch.distributed`` (``torchrun``).

    torchrun --nproc_per_node 2 -m engine.distributed --data digits --model logreg --out runs/x
    torchrun --nproc_per_node 8 $(which influence) build --distributed --data D --model M --out RUN

NCCL on GPUs (rank r uses ``cuda:LOCAL_RANK``), gloo on CPUs. How the work is split:

- θ̂ is trained (or taken from a resumed build) on rank 0 and broadcast to every rank.
- The training set is sharded into contiguous row ranges (:func:`shard_rows`). Every rank writes
  its own rows into the *same* memory-mapped ``grads.npy.tmp`` and done bitmap, created by rank 0
  in the run's partial build folder, so the finished store is one file, byte for byte the store a
  one-process build writes. All ranks must therefore see the same ``--out`` folder (one machine,
  or a shared filesystem across machines).
- The curvature is reduced across processes: each rank applies the Hessian of its shard's mean
  loss and the results are summed with weights ``n_shard / n`` (``all_reduce``), then λ + δ is
  added once, so every Hessian-vector product (dense Hessian, ``PᵀHP``, the LiSSA scale) is the
  full-batch one; a dense Hessian formed per rank (the closed form of linear models) is reduced
  the same way, as one (p, p) ``all_reduce``. EK-FAC's covariances come from each rank's store
  pass over its rows and Λ from its rows, each summed across ranks, with rank 0's eigenbases
  (:func:`engine.ihvp.ekfac.fit_ekfac`'s ``comm``); a resumed build fits them on rank 0.
- Rank 0 finishes the store, writes ``run.json`` last and renames the folder into place.

A killed distributed build resumes like a local one (``--resume``), with any number of ranks.
Queries over a store kept in shards merge per-shard top-k with :func:`engine.query.topk.merge_topk`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "Comm",
    "LocalComm",
    "TorchComm",
    "init_comm",
    "launched_by_torchrun",
    "main",
    "reduced_hessian",
    "reduced_hvp",
    "shard_rows",
]

TIMEOUT_ENV = "INFLUENCE_DIST_TIMEOUT_S"  # rank 0 trains while the others wait: a long default
DEFAULT_TIMEOUT_S = 4 * 3600


def shard_rows(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous rows of n: ``[n·r/W, n·(r+1)/W)`` (sizes differ by at most 1)."""
    return slice(n * rank // world, n * (rank + 1) // world)


class Comm:
    """What the build needs from a process group; :class:`LocalComm` is the one-process case."""

    rank: int = 0
    world: int = 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None: ...

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank (in place)."""
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of ``t`` (in place)."""
        return t

    def device(self, default: torch.device) -> torch.device:
        """The device this rank computes on."""
        return default


class LocalComm(Comm):
    """One process: every collective is the identity."""


class TorchComm(Comm):
    """A ``torch.distributed`` process group (NCCL tensors live on this rank's GPU)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.backend = dist.get_backend()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def barrier(self) -> None:
        dist.barrier()

    def _via(self, t: torch.Tensor, op: Callable[[torch.Tensor], Any]) -> torch.Tensor:
        # NCCL reduces GPU tensors, gloo CPU tensors: move if needed, copy the answer back
        want = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        buf = t if t.device == want else t.to(want)
        op(buf)
        if buf is not t:
            t.copy_(buf)
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        return self._via(t, lambda b: dist.broadcast(b, src=0))

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._via(t, lambda b: dist.all_reduce(b, op=dist.ReduceOp.SUM))

    def device(self, default: torch.device) -> torch.device:
        if default.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return default


def launched_by_torchrun() -> bool:
    """True when the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR) is set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def init_comm(device: str = "auto") -> TorchComm:
    """Join the process group torchrun describes (NCCL when GPUs are used, else gloo)."""
    from .errors import InfluenceError

    if not launched_by_torchrun():
        raise InfluenceError("--distributed needs the torchrun environment (RANK, WORLD_SIZE, "
                             "MASTER_ADDR); start it with torchrun --nproc_per_node N ...")
    if not dist.is_initialized():
        gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if gpu else "gloo", timeout=timeout)
    return TorchComm()


def reduced_hvp(local: Callable[[torch.Tensor], torch.Tensor], *, weight: float, shift: float,
                comm: Comm) -> Callable[[torch.Tensor], torch.Tensor]:
    """V ↦ Σ_r w_r H_r V + shift·V: ``local`` is this rank's data-loss HVP (its shard's mean,
    no shift), ``weight`` its share n_shard / n. One process: ``local(V) + shift·V``."""

    def hvp(vectors: torch.Tensor) -> torch.Tensor:
        out = local(vectors)
        if comm.world > 1:
            out = comm.all_reduce_sum(weight * out)
        return out + shift * vectors

    return hvp


def reduced_hessian(local: torch.Tensor, *, weight: float, shift: float, comm: Comm) -> torch.Tensor:
    """Σ_r w_r H_r + shift·I, symmetrised: ``local`` is this rank's dense data-loss Hessian (p, p)
    (its shard's mean, no shift), ``weight`` its share n_shard / n. One process: ``local + shift·I``."""
    from .ihvp.hessian import with_shift

    if comm.world > 1:
        local = comm.all_reduce_sum(weight * local)
    return with_shift(local, shift)


def build_distributed(data: str, model: str, out: str, **kwargs: Any) -> Any:
    """:func:`engine.build` across the torchrun processes; the opened run on rank 0, None elsewhere."""
    from .build import build

    comm = init_comm(str(kwargs.get("device", "auto")))
    try:
        return build(data, model, out, comm=comm, **kwargs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.distributed`` under torchrun: the core build options only (the full set
    is ``influence build --distributed``)."""
    from .errors import InfluenceError
    from .options import add_build_options, build_kwargs

    p = argparse.ArgumentParser(prog="python -m engine.distributed")
    add_build_options(p)  # the same options and defaults as `influence build`
    a = p.parse_args(argv)
    try:
        run = build_distributed(a.data, a.model, a.out, progress=False, **build_kwargs(a))
    except InfluenceError as exc:
        print(f"influence: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if run is not None:
        print(f"built {run.path} on {int(os.environ.get('WORLD_SIZE', '1'))} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
