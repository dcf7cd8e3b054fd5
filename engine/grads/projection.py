"""A seeded Gaussian random projection ``P`` (p, K), entries N(0, 1/K), generated in blocks.

Rows of P are generated in blocks of ``ROW_BLOCK`` from a CPU generator seeded by (seed, block),
so the same seed gives the same P on any device or process (the distributed build's ranks
project with the same P), and P is never read from disk. Generating is the slow part, so slabs
are cached on the projector's device up to ``cache_bytes``: when all of P fits (a 0.42M-parameter
model at K = 2048 is 1.7 GB in bfloat16), projecting a gradient block is one matrix product
``g P``; otherwise the cached slabs are reused and the rest regenerated per call, so memory
stays bounded by the budget plus one (ROW_BLOCK, K) slab.
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["ROW_BLOCK", "Projector", "default_cache_bytes"]

ROW_BLOCK = 8192
CPU_CACHE_BYTES = 1 << 30  # 1 GiB of cached P on the CPU
CUDA_CACHE_FRACTION = 0.125  # of the GPU's memory


def default_cache_bytes(device: torch.device) -> int:
    """How much of P to keep on ``device`` by default."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * CUDA_CACHE_FRACTION)
    return CPU_CACHE_BYTES


class Projector:
    """``g ↦ g P`` for gradient blocks g (b, p); P (p, K) seeded by ``seed``.

    ``dtype`` is the dtype P is kept and applied in (float32 / float16 / bfloat16 make the
    product run on tensor cores on a GPU, with float32 accumulation); ``cache_bytes`` bounds the
    cached part of P (default: :func:`default_cache_bytes`; 0 regenerates every slab per call).
    """

    def __init__(self, n_params: int, k: int, *, seed: int, dtype: torch.dtype,
                 device: torch.device, cache_bytes: int | None = None) -> None:
        self.n_params = n_params
        self.k = k
        self.seed = seed
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_blocks = math.ceil(n_params / ROW_BLOCK)
        budget = default_cache_bytes(self.device) if cache_bytes is None else cache_bytes
        itemsize = torch.empty((), dtype=dtype).element_size()
        self._whole = n_params * k * itemsize <= budget  # keep P as one (p, K) matrix
        self._max_slabs = min(self.n_blocks, budget // max(1, ROW_BLOCK * k * itemsize))
        self._slabs: dict[int, torch.Tensor] = {}
        self._matrix: torch.Tensor | None = None
        self._lock = threading.Lock()  # concurrent first queries build P (or a slab) once

    def _generate(self, block: int) -> torch.Tensor:
        start = block * ROW_BLOCK
        rows = min(ROW_BLOCK, self.n_params - start)
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + block)
        slab = torch.randn(rows, self.k, generator=gen, dtype=torch.float64)
        return (slab / math.sqrt(self.k)).to(device=self.device, dtype=self.dtype)  # (rows, K)

    def _slab(self, block: int) -> torch.Tensor:
        hit = self._slabs.get(block)
        if hit is not None:
            return hit
        if len(self._slabs) >= self._max_slabs:
            return self._generate(block)  # not kept: no lock needed
        with self._lock:
            hit = self._slabs.get(block)
            if hit is None:
                hit = self._generate(block)
                if len(self._slabs) < self._max_slabs:
                    self._slabs[block] = hit
        return hit

    def matrix(self) -> torch.Tensor | None:
        """All of P (p, K) when it fits the cache budget (built once, whichever thread comes
        first; the others wait for it), else None."""
        if self._matrix is None and self._whole:
            with self._lock:
                if self._matrix is None:
                    self._matrix = torch.cat([self._generate(b) for b in range(self.n_blocks)], 0)
                    self._slabs.clear()
        return self._matrix

    @property
    def cached_bytes(self) -> int:
        held = [self._matrix] if self._matrix is not None else list(self._slabs.values())
        return sum(t.numel() * t.element_size() for t in held)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """g (b, p) → g P (b, K) in the projector's dtype."""
        whole = self.matrix()
        if whole is not None:
            return g.to(self.dtype) @ whole  # (b, K)
        low = self.dtype in (torch.float16, torch.bfloat16)  # sum the slabs' products in float32
        out = torch.zeros(g.shape[0], self.k, dtype=torch.float32 if low else self.dtype,
                          device=self.device)
        for block in range(self.n_blocks):
            start = block * ROW_BLOCK
            slab = self._slab(block)
            out += g[:, start : start + slab.shape[0]].to(self.dtype) @ slab
        return out.to(self.dtype)

    def columns(self, cols: slice) -> torch.Tensor:
        """P[:, cols] (p, kb)."""
        whole = self.matrix()
        if whole is not None:
            return whole[:, cols]
        return torch.cat([self._slab(b)[:, cols] for b in range(self.n_blocks)], 0)
