"""Top-k of score columns, streamed over row blocks (constant memory), and its naive reference."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["RunningTopK", "streaming_topk", "naive_topk"]


class RunningTopK:
    """The k largest (or smallest) values per column seen so far, and their row indices.

    Captum's pattern: top-k of each block, merged with the running best, so only k rows per
    column are kept between blocks. Exact ties may come in any order.
    """

    def __init__(self, k: int, *, largest: bool) -> None:
        self.k = k
        self.largest = largest
        self.values: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None

    def update(self, offset: int, block: torch.Tensor) -> None:
        """Take a block of scores (b, m) whose first row is row ``offset``."""
        v, i = torch.topk(block, min(self.k, block.shape[0]), dim=0, largest=self.largest)
        i = i + offset
        if self.values is not None and self.indices is not None:
            v, i = torch.cat([self.values, v]), torch.cat([self.indices, i])
            sel = torch.topk(v, min(self.k, v.shape[0]), dim=0, largest=self.largest).indices
            v, i = torch.gather(v, 0, sel), torch.gather(i, 0, sel)
        self.values, self.indices = v, i

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Values and row indices, each (min(k, n), m), best first."""
        if self.values is None or self.indices is None:
            raise ValueError("no score blocks")
        return self.values, self.indices


def streaming_topk(blocks: Iterable[tuple[int, torch.Tensor]], k: int, *, largest: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, the k largest (or smallest) values over all ``(row_offset, (b, m))`` blocks."""
    acc = RunningTopK(k, largest=largest)
    for offset, block in blocks:
        acc.update(offset, block)
    return acc.result()


def naive_topk(scores: torch.Tensor, k: int, *, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: a full stable argsort of each column of scores (n, m)."""
    key = -scores if largest else scores
    idx = torch.sort(key, dim=0, stable=True).indices[: min(k, scores.shape[0])]
    return torch.gather(scores, 0, idx), idx
