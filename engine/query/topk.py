"""Top-k of score columns, streamed over row blocks (constant memory), and its naive reference."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["streaming_topk", "naive_topk"]


def streaming_topk(blocks: Iterable[tuple[int, torch.Tensor]], k: int, *, largest: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, the k largest (or smallest) values over all row blocks and their row indices.

    ``blocks`` yields ``(row_offset, scores (b, m))``; only k rows per column are kept between
    blocks (Captum's pattern: top-k per block, merged with the running best). Returns values and
    row indices, each (min(k, n), m), best first; exact ties may come in any order.
    """
    best_v: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for offset, block in blocks:
        v, i = torch.topk(block, min(k, block.shape[0]), dim=0, largest=largest, sorted=True)
        i = i + offset
        if best_v is not None and best_i is not None:
            v, i = torch.cat([best_v, v]), torch.cat([best_i, i])
            sel = torch.topk(v, min(k, v.shape[0]), dim=0, largest=largest, sorted=True).indices
            v, i = torch.gather(v, 0, sel), torch.gather(i, 0, sel)
        best_v, best_i = v, i
    if best_v is None or best_i is None:
        raise ValueError("no score blocks")
    return best_v, best_i


def naive_topk(scores: torch.Tensor, k: int, *, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: a full stable argsort of each column of scores (n, m)."""
    key = -scores if largest else scores
    idx = torch.sort(key, dim=0, stable=True).indices[: min(k, scores.shape[0])]
    return torch.gather(scores, 0, idx), idx
