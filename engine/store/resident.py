"""The gradient store held in memory on the query device, in the store's own dtype.

A float16 / bfloat16 store stays float16 / bfloat16 on the device (half the bytes of float32, a
quarter of float64); scores are formed block by block with float32 accumulation, so the only
full-size array is the store itself. Full-precision stores (float32, float64) score in their
own dtype, exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .gradients import TORCH_DTYPES, as_torch

__all__ = [
    "LOW_PRECISION",
    "ResidentStore",
    "block_product",
    "block_product_t",
    "scaled_product",
    "scaled_product_t",
]

LOW_PRECISION = (torch.float16, torch.bfloat16)
CPU_BLOCK_ELEMENTS = 1 << 22  # (rows × max(d, m)) per block on the CPU: ~32 MiB in float64
CUDA_BLOCK_ELEMENTS = 1 << 28  # on a GPU fewer, larger products: ~1 GiB of float32 scores
LOAD_CHUNK_BYTES = 1 << 28  # host → device copies of the memory map, 256 MiB at a time

_MM_OUT_DTYPE: dict[str, bool] = {}  # device type → torch.mm(..., out_dtype=float32) works


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as float32 for low-precision a, b: ``mm(..., out_dtype=float32)`` where torch has
    it for the device (tensor cores, float32 accumulation and result); otherwise the operands
    upcast to float32 (never a float16 result, which can overflow, nor a bfloat16 one, which
    rounds every score to 8 bits)."""
    key = a.device.type
    if _MM_OUT_DTYPE.get(key, True):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:  # a RuntimeError too: not a sign the op is missing
            raise
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[key] = False
    return a.float() @ b.float()


def _unit_columns(s: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s / scale, scale)`` with scale = max |s| along ``dim`` (kept), in float32: query columns
    scaled to max 1 so that casting them to float16 neither overflows (> 65504) nor flushes small
    entries (< 6e-8) to zero; multiply the product by ``scale`` to put it back."""
    scale = s.abs().amax(dim=dim, keepdim=True).float().clamp_min(torch.finfo(torch.float32).tiny)
    return s.float() / scale, scale


def scaled_product(rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``rows @ s`` (b, m), float32, for low-precision rows (b, d) and any s (d, m): the product
    runs in the rows' dtype on unit-scaled query columns (see :func:`_unit_columns`)."""
    unit, scale = _unit_columns(s, 0)  # (d, m), (1, m)
    return _mm_float32(rows, unit.to(rows.dtype)) * scale


def scaled_product_t(s_t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``s_t @ rowsᵀ`` (m, b), float32: :func:`scaled_product` transposed."""
    unit, scale = _unit_columns(s_t, 1)  # (m, d), (m, 1)
    return _mm_float32(unit.to(rows.dtype), rows.T) * scale


def block_product(rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``rows @ s`` for store rows (b, d) in the store dtype and s (d, m): (b, m).

    Full-precision rows: in the rows' dtype. Low-precision rows: float32 result; on the CPU the
    block is upcast to float32 (the CPU has no fast half-precision product); on a GPU
    :func:`scaled_product` (tensor cores, float32 accumulation).
    """
    if rows.dtype not in LOW_PRECISION:
        return rows @ s.to(rows.dtype)
    if rows.device.type == "cpu":
        return rows.float() @ s.float()
    return scaled_product(rows, s)


def block_product_t(s_t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``s_t @ rowsᵀ`` (m, b) for s_t (m, d) and store rows (b, d): :func:`block_product`
    transposed, so that a top-k over the rows runs along contiguous memory."""
    if rows.dtype not in LOW_PRECISION:
        return s_t.to(rows.dtype) @ rows.T
    if rows.device.type == "cpu":
        return s_t.float() @ rows.float().T
    return scaled_product_t(s_t, rows)


class ResidentStore:
    """The (n, d) store on ``device`` in its own dtype, scored in blocks."""

    def __init__(self, data: torch.Tensor, *, compute_dtype: torch.dtype) -> None:
        self.data = data  # (n, d) store dtype
        self.compute_dtype = compute_dtype

    @classmethod
    def load(cls, array: np.ndarray, dtype: str, *, device: torch.device,
             compute_dtype: torch.dtype) -> ResidentStore:
        """Copy the memory map ``array`` (manifest dtype ``dtype``) onto ``device``, in chunks."""
        n, d = array.shape
        data = torch.empty((n, d), dtype=TORCH_DTYPES[dtype], device=device)
        step = max(1, LOAD_CHUNK_BYTES // max(1, d * data.element_size()))
        for start in range(0, n, step):
            data[start : start + step] = as_torch(array[start : start + step], dtype).to(device)
        return cls(data, compute_dtype=compute_dtype)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def block_rows(self, m: int = 1) -> int:
        """Rows per score block for m query columns."""
        budget = CUDA_BLOCK_ELEMENTS if self.data.device.type == "cuda" else CPU_BLOCK_ELEMENTS
        return int(min(max(self.data.shape[0], 1), max(256, budget // max(self.data.shape[1], m))))

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Store rows in the compute dtype ((b, d); a gather copies only those rows)."""
        return self.data[index].to(self.compute_dtype)

    def rows_product(self, ids: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``store[ids] @ s`` (c, m) for row ids (c,) and s (d, m): only those rows are gathered,
        and multiplied as :meth:`products` multiplies a block (so the same numbers, to rounding)."""
        return block_product(self.data[ids], s)

    def row_sum(self, ids: torch.Tensor) -> torch.Tensor:
        """``Σ store[ids]`` (d,) in the compute dtype, gathered and upcast a block at a time."""
        out = torch.zeros(self.data.shape[1], dtype=self.compute_dtype, device=self.data.device)
        step = self.block_rows()
        for start in range(0, len(ids), step):
            out += self.data[ids[start : start + step]].to(self.compute_dtype).sum(dim=0)
        return out

    def to_numpy(self, dtype: type = np.float32) -> np.ndarray:
        """The whole store as a host array of ``dtype`` (n, d), converted a block at a time (the
        only full-size arrays are the store and the result)."""
        out = np.empty(tuple(self.data.shape), dtype=dtype)
        step = self.block_rows()
        target = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        for start in range(0, self.data.shape[0], step):
            out[start : start + step] = self.data[start : start + step].to(target).cpu().numpy()
        return out

    def products(self, s: torch.Tensor, *, block: int | None = None
                 ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, store[offset:offset+b] @ s)`` for s (d, m), one product per row block."""
        n = self.data.shape[0]
        step = block or self.block_rows(s.shape[1] if s.dim() == 2 else 1)
        for start in range(0, n, step):
            yield start, block_product(self.data[start : start + step], s)

    def products_t(self, s_t: torch.Tensor, *, block: int | None = None
                   ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, s_t @ store[offset:offset+b]ᵀ)`` (m, b) for s_t (m, d), one product per block."""
        n = self.data.shape[0]
        step = block or self.block_rows(s_t.shape[0])
        for start in range(0, n, step):
            yield start, block_product_t(s_t, self.data[start : start + step])

    def row_norms(self) -> torch.Tensor:
        """‖store row‖ (n,) in float64 computed block by block."""
        step = self.block_rows()
        return torch.cat([torch.linalg.vector_norm(self.data[s : s + step], dim=1, dtype=torch.float64)
                          for s in range(0, self.data.shape[0], step)])
