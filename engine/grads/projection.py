"""A seeded Gaussian random projection ``P`` (p, K), entries N(0, 1/K), never stored whole.

Rows of P are generated in blocks of ``ROW_BLOCK`` from a generator seeded by (seed, block), so
the same seed gives the same P on any device or process, and projecting a gradient block only
ever holds one (ROW_BLOCK, K) slab.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Projector", "ROW_BLOCK"]

ROW_BLOCK = 8192


class Projector:
    def __init__(self, n_params: int, k: int, *, seed: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.n_params = n_params
        self.k = k
        self.seed = seed
        self.dtype = dtype
        self.device = device

    def _slab(self, block: int) -> torch.Tensor:
        start = block * ROW_BLOCK
        rows = min(ROW_BLOCK, self.n_params - start)
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + block)
        slab = torch.randn(rows, self.k, generator=gen, dtype=torch.float64)
        return (slab / math.sqrt(self.k)).to(device=self.device, dtype=self.dtype)  # (rows, K)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """g (b, p) → g P (b, K)."""
        out = torch.zeros(g.shape[0], self.k, dtype=self.dtype, device=self.device)
        for block in range(math.ceil(self.n_params / ROW_BLOCK)):
            start = block * ROW_BLOCK
            slab = self._slab(block)
            out += g[:, start : start + slab.shape[0]].to(self.dtype) @ slab
        return out

    def columns(self, cols: slice) -> torch.Tensor:
        """P[:, cols] (p, kb)."""
        return torch.cat(
            [self._slab(b)[:, cols] for b in range(math.ceil(self.n_params / ROW_BLOCK))], 0
        )
