"""Top-k of score columns, streamed over row blocks (constant memory), merged across shards,
and its naive reference."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["RunningTopK", "helpful_harmful", "merge_topk", "naive_topk", "streaming_topk"]


class RunningTopK:
    """The k largest (or smallest) values per column seen so far, and their row indices.

    Captum's pattern: top-k of each block, merged with the running best, so only k rows per
    column are kept between blocks. Kept as (m, k) with the rows along the last dimension, so a
    block given as (m, b) (:meth:`update_t`, what a product ``sᵀ Gᵀ`` yields) is selected along
    contiguous memory. Exact ties may come in any order.
    """

    def __init__(self, k: int, *, largest: bool) -> None:
        self.k = k
        self.largest = largest
        self._values: torch.Tensor | None = None  # (m, k)
        self._indices: torch.Tensor | None = None  # (m, k)

    def update(self, offset: int, block: torch.Tensor) -> None:
        """Take a block of scores (b, m) whose first row is row ``offset``."""
        self.update_t(offset, block.T)

    def update_t(self, offset: int, block_t: torch.Tensor) -> None:
        """Take a block of scores given transposed, (m, b), whose first row is row ``offset``."""
        v, i = torch.topk(block_t, min(self.k, block_t.shape[1]), dim=1, largest=self.largest)
        i = i + offset
        if self._values is not None and self._indices is not None:
            v, i = torch.cat([self._values, v], 1), torch.cat([self._indices, i], 1)
            sel = torch.topk(v, min(self.k, v.shape[1]), dim=1, largest=self.largest).indices
            v, i = torch.gather(v, 1, sel), torch.gather(i, 1, sel)
        self._values, self._indices = v, i

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Values and row indices, each (min(k, n), m), best first."""
        if self._values is None or self._indices is None:
            raise ValueError("no score blocks")
        return self._values.T, self._indices.T


def streaming_topk(blocks: Iterable[tuple[int, torch.Tensor]], k: int, *, largest: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, the k largest (or smallest) values over all ``(row_offset, (b, m))`` blocks."""
    acc = RunningTopK(k, largest=largest)
    for offset, block in blocks:
        acc.update(offset, block)
    return acc.result()


TopK = tuple[torch.Tensor, torch.Tensor]


def helpful_harmful(products_t: Iterable[tuple[int, torch.Tensor]], k: int) -> tuple[TopK, TopK]:
    """Helpful and harmful top-k of ``scores = −G s`` from blocks of ``sᵀGᵀ`` (m, b) in one pass.

    ``products_t`` yields ``(row_offset, sᵀ G[rows]ᵀ)``; each block feeds both running top-k:
    the largest products are the most negative scores (helpful), the smallest the most positive
    (harmful), so no block is negated or kept. Returns ``((values, ids), (values, ids))`` for
    helpful (most negative first) and harmful (most positive first), each (k, m), scores signed.
    """
    helpful, harmful = RunningTopK(k, largest=True), RunningTopK(k, largest=False)
    for offset, prod in products_t:  # (m, b)
        helpful.update_t(offset, prod)
        harmful.update_t(offset, prod)
    (hv, hi), (av, ai) = helpful.result(), harmful.result()
    return (-hv, hi), (-av, ai)


def merge_topk(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int, *, largest: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-shard top-k results into the top-k of the whole store.

    ``parts``: per shard, ``(values, indices)`` each (k_s, m) with indices already *global* row
    ids (shard offset added), as :class:`RunningTopK` or a shard's own query returns them.
    Returns (min(k, Σ k_s), m) values and indices, best first: the same set as a top-k over the
    unsharded scores (exact ties may come in any order).
    """
    if not parts:
        raise ValueError("no shard results to merge")
    v = torch.cat([p[0] for p in parts], 0)  # (Σ k_s, m)
    i = torch.cat([p[1].to(v.device) for p in parts], 0)
    sel = torch.topk(v, min(k, v.shape[0]), dim=0, largest=largest).indices
    return torch.gather(v, 0, sel), torch.gather(i, 0, sel)


def naive_topk(scores: torch.Tensor, k: int, *, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: a full stable argsort of each column of scores (n, m)."""
    key = -scores if largest else scores
    idx = torch.sort(key, dim=0, stable=True).indices[: min(k, scores.shape[0])]
    return torch.gather(scores, 0, idx), idx
