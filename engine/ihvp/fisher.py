"""The damped empirical Fisher of the stored gradients: ``H ≈ (1/n) Σ_i g̃_i g̃_iᵀ + (λ+δ)I`` (K×K).

g̃_i are the store's rows (per-sample data-loss gradients, projected or not), λ the weight decay
and δ the damping, so the curvature costs one pass over the store and no Hessian-vector
product. The K×K Gram ``Σ_i g̃_i g̃_iᵀ`` is accumulated block by block in float64 (whatever the
store's dtype), then factorised once by :class:`~engine.ihvp.exact.ExactSolver` (Cholesky; a
symmetric eigendecomposition if rounding makes it fail) and kept in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from ..config import IHVPMethod
from ..errors import SolverError
from .exact import ExactSolver
from .lissa import largest_eigenvalue

__all__ = ["FisherSolver", "fisher_gram", "store_blocks"]

# until IHVPMethod names it (then this is IHVPMethod.FISHER)
METHOD = IHVPMethod.FISHER
EXACT_SPECTRUM_DIM = 4096  # up to this K the spectrum is exact (eigvalsh, ~4 s at 4096 on 2 cores)
POWER_ITERS = 50  # above it: power-iteration estimates of the extreme eigenvalues
GRAM_BLOCK_ELEMENTS = 1 << 22  # rows × K per float64 block (32 MiB)


class RowSource(Protocol):
    """What :func:`store_blocks` reads: a store with ``shape`` (n, K) and ``rows(slice)``
    (:class:`~engine.store.resident.ResidentStore`)."""

    @property
    def shape(self) -> torch.Size: ...

    def rows(self, index: slice) -> torch.Tensor: ...


def store_blocks(store: RowSource | torch.Tensor, *, block: int | None = None) -> Iterable[torch.Tensor]:
    """Row blocks (b, K) of a resident store or of an (n, K) tensor, ``block`` rows at a time
    (default: ~32 MiB of float64 per block)."""
    n, k = int(store.shape[0]), int(store.shape[1])
    step = block or max(1, GRAM_BLOCK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        index = slice(start, min(start + step, n))
        yield store[index] if isinstance(store, torch.Tensor) else store.rows(index)


def fisher_gram(blocks: Iterable[torch.Tensor], *, device: torch.device | None = None
                ) -> tuple[torch.Tensor, int]:
    """``(Σ_i g̃_i g̃_iᵀ (K, K) float64, n)`` over the rows of ``blocks`` ((b, K) each, any dtype);
    each block is upcast to float64 before its product, so a float16 store loses nothing more
    than its own rounding. ``device``: where to accumulate (default: the first block's)."""
    gram: torch.Tensor | None = None
    n = 0
    for rows in blocks:
        rows = rows.to(device=device or rows.device, dtype=torch.float64)  # (b, K)
        if gram is None:
            gram = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
        gram.addmm_(rows.T, rows)  # (K, K)
        n += rows.shape[0]
    if gram is None:
        raise ValueError("the Fisher needs at least one stored row")
    return 0.5 * (gram + gram.T), n


class FisherSolver(ExactSolver):
    """``H⁻¹B`` for ``H = (1/n) Σ_i g̃_i g̃_iᵀ + (λ+δ)I`` (K, K), the damped empirical Fisher of the
    store's rows g̃_i (n, K); B (K,) or (K, m) in the store's space, the answer in float64.

    ``rows``: a resident store (``shape``, ``rows(slice)``), an (n, K) tensor, or a callable
    returning an iterable of row blocks (b, K) (read once). ``weight_decay`` λ and ``damping`` δ
    are reported separately; their sum is the shift. With ``n < K`` the Fisher is singular and
    the shift must be positive (:class:`~engine.errors.SolverError` otherwise).
    """

    def __init__(self, rows: RowSource | torch.Tensor | Callable[[], Iterable[torch.Tensor]], *,
                 weight_decay: float = 0.0, damping: float = 0.0, device: torch.device | None = None,
                 explicit_inverse: bool | None = None) -> None:
        blocks = rows() if callable(rows) and not isinstance(rows, torch.Tensor) else store_blocks(rows)
        gram, n = fisher_gram(blocks, device=device)
        if weight_decay + damping <= 0 and n < gram.shape[0]:
            raise SolverError(f"the Fisher of {n} gradients in {gram.shape[0]} dimensions is singular; "
                              "rebuild with --damping > 0 or a larger --weight-decay")
        self.n = n
        self.weight_decay = float(weight_decay)
        self.damping = float(damping)
        self.shift = self.weight_decay + self.damping
        hessian = gram.div_(n)  # (K, K) the Fisher, in place
        hessian.diagonal().add_(self.shift)
        super().__init__(hessian, method=METHOD, explicit_inverse=explicit_inverse)
        self._spectrum_estimated = False

    def _spectrum(self) -> tuple[float, float]:
        """Exact extreme eigenvalues up to K = ``EXACT_SPECTRUM_DIM``; above, power-iteration
        estimates (from below for the largest, from above for the smallest, via H⁻¹), which
        cost O(K²) per step instead of an O(K³) eigendecomposition."""
        k = self.hessian.shape[0]
        if self._evals is None and k > EXACT_SPECTRUM_DIM:
            common = {"n_params": k, "dtype": self.hessian.dtype, "device": self.hessian.device,
                      "iters": POWER_ITERS}
            high = largest_eigenvalue(lambda v: self.hessian @ v, **common)
            inv_high = largest_eigenvalue(self._solve, **common)
            low = 1.0 / inv_high if self.positive_definite else float("nan")
            self._evals, self._spectrum_estimated = (low, high), True
        return super()._spectrum()

    def settings(self) -> dict[str, Any]:
        low, high = self._spectrum()
        return {"method": getattr(self.method, "value", self.method), "n": self.n,
                "k": int(self.hessian.shape[0]), "weight_decay": self.weight_decay,
                "damping": self.damping, "shift": self.shift,
                "factorisation": "cholesky" if self.positive_definite else "eigh",
                "explicit_inverse": self._inverse is not None,
                "positive_definite": self.positive_definite,
                "min_eigenvalue": low, "max_eigenvalue": high, "condition_number": abs(high / low),
                "spectrum": "power-iteration estimate" if self._spectrum_estimated else "exact"}
