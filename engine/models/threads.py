"""How many CPU threads PyTorch's operators use while a network trains.

Every parallel operator waits for its slowest thread, and on a shared machine one descheduled
thread stalls the whole step: measured on a 2-core machine under load 5–8, the built-in ``cnn``
trained at 150–230 images/s with PyTorch's default of 2 threads and at 2,400–5,000 with one
(a 64×10 ``log_softmax`` took 2.5–11 ms instead of 12 µs). So training takes at most half the
cores (at least one); ``TrainConfig.threads`` sets the number. The count only ever goes down
(a server that runs one thread per request keeps its one), and the previous count comes back
afterwards. The thread count changes floating-point summation orders, so a fixed count keeps a
seed's θ̂ reproducible on one machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

__all__ = ["auto_threads", "flushing_denormals", "intra_op_threads", "set_flush_denormal_everywhere"]

logger = logging.getLogger(__name__)

_TEAM_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # void (*fn)(void *data)


def auto_threads() -> int:
    """Half the machine's cores, at least one: the count ``threads = 0`` (auto) trains with."""
    return max(1, (os.cpu_count() or 1) // 2)


def flushing_denormals() -> bool:
    """Whether this thread's CPU flushes denormal floats to zero now."""
    return bool(torch.tensor(1e-39, dtype=torch.float32).item() == 0.0)


@functools.cache
def _omp_parallel() -> Callable[..., None] | None:
    """``GOMP_parallel(fn, data, num_threads, flags)`` of the OpenMP runtime PyTorch's own CPU
    library uses, or None (not an OpenMP build, or no such entry point). The symbol is looked up
    through ``libtorch_cpu``, whose dependencies come first: another copy of libgomp in the
    process (scikit-learn ships one) would start a thread pool of its own that torch never uses."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        logger.info("PyTorch's parallel backend is not OpenMP: denormals are flushed on the calling thread only")
        return None
    lib = Path(torch.__file__).parent / "lib"
    try:
        library = next(p for p in (lib / "libtorch_cpu.so", lib / "libtorch_cpu.dylib") if p.is_file())
        fn = ctypes.CDLL(str(library)).GOMP_parallel
    except (StopIteration, OSError, AttributeError) as exc:
        logger.info("no OpenMP team call in PyTorch's library (%s): denormals are flushed on the "
                    "calling thread only", type(exc).__name__)
        return None
    fn.argtypes = [_TEAM_FN, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    fn.restype = None
    return fn


def set_flush_denormal_everywhere(mode: bool) -> int:
    """``torch.set_flush_denormal(mode)`` on the calling thread and on every thread of its OpenMP
    team (``torch.get_num_threads()`` of them), where PyTorch's intra-op work runs: the mode is a
    per-thread CPU flag, so setting it on the calling thread alone left a 2-thread elementwise op
    on denormal inputs half flushed. Returns how many threads were set (1 where the OpenMP
    runtime cannot be called: the calling thread only)."""
    torch.set_flush_denormal(mode)
    team = torch.get_num_threads()
    parallel = _omp_parallel() if team > 1 else None
    if parallel is None:
        return 1
    reached: list[int] = []

    def each(_data: int | None) -> None:  # runs once on every thread of the team
        torch.set_flush_denormal(mode)
        reached.append(1)

    parallel(_TEAM_FN(each), None, team, 0)
    return len(reached)


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[int]:
    """Run the block with at most ``n`` PyTorch intra-op threads (0: :func:`auto_threads`),
    never more than are set now, and with denormal floats flushed to zero; yields the count in
    use and restores the previous count and denormal mode.

    Denormals (|x| < 1.2e-38 in float32) take the CPU's slow path: as a network fits its
    training set, the output gradients of confidently fitted points shrink into that range and
    the backward pass slows with them (a ResNet's epochs on 5,000 Fashion-MNIST images went from
    14 s to 116 s; a synthetic backward with such gradients 1.6× slower). Flushing them changes
    values below 1.2e-38 only. The mode is a per-thread flag: it is set on the calling thread and
    on its OpenMP team (:func:`set_flush_denormal_everywhere`), and afterwards every one of them
    takes the calling thread's previous mode."""
    before = torch.get_num_threads()
    use = max(1, min(n if n > 0 else auto_threads(), before))
    flushing = flushing_denormals()
    if use != before:
        torch.set_num_threads(use)
    try:
        set_flush_denormal_everywhere(True)
        yield use
    finally:
        if use != before:
            torch.set_num_threads(before)
        set_flush_denormal_everywhere(flushing)
