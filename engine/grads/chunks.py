"""Row blocks computed chunk by chunk and either streamed to a sink or gathered."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["Sink", "stream_rows"]

Sink = Callable[[slice, torch.Tensor], None]


def stream_rows(n: int, chunk: int, compute: Callable[[slice], torch.Tensor], *,
                sink: Sink | None = None, progress: Callable[[int], None] | None = None,
                empty: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """``compute(rows)`` (b, d) for consecutive row slices of ``range(n)``, each handed to
    ``sink(rows, block)`` (then None is returned) or concatenated (n, d); ``empty()`` is the
    (0, d) result for n = 0; ``progress(b)`` after each chunk."""
    out: list[torch.Tensor] = []
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        block = compute(rows)  # (b, d)
        if sink is None:
            out.append(block)
        else:
            sink(rows, block)
        if progress is not None:
            progress(rows.stop - rows.start)
    if sink is not None:
        return None
    return torch.cat(out) if out else empty()
