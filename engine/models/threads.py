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
import os
from collections.abc import Iterator

import torch

__all__ = ["auto_threads", "flushing_denormals", "intra_op_threads"]


def auto_threads() -> int:
    """Half the machine's cores, at least one: the count ``threads = 0`` (auto) trains with."""
    return max(1, (os.cpu_count() or 1) // 2)


def flushing_denormals() -> bool:
    """Whether this thread's CPU flushes denormal floats to zero now."""
    return bool(torch.tensor(1e-39, dtype=torch.float32).item() == 0.0)


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[int]:
    """Run the block with at most ``n`` PyTorch intra-op threads (0: :func:`auto_threads`),
    never more than are set now, and with denormal floats flushed to zero; yields the count in
    use and restores the previous count and denormal mode.

    Denormals (|x| < 1.2e-38 in float32) take the CPU's slow path: as a network fits its
    training set, the output gradients of confidently fitted points shrink into that range and
    the backward pass slows with them (a ResNet's epochs on 5,000 Fashion-MNIST images went from
    14 s to 116 s; a synthetic backward with such gradients 1.6× slower). Flushing them changes
    values below 1.2e-38 only. The mode is per thread (the calling one; with one intra-op thread,
    the default on 2 cores, that is every one)."""
    before = torch.get_num_threads()
    use = max(1, min(n if n > 0 else auto_threads(), before))
    flushing = flushing_denormals()
    if use != before:
        torch.set_num_threads(use)
    if not flushing:
        torch.set_flush_denormal(True)
    try:
        yield use
    finally:
        if use != before:
            torch.set_num_threads(before)
        if not flushing:
            torch.set_flush_denormal(False)
