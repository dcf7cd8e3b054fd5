"""Data-aware Kronecker bases (``--kronecker-basis pca``): each tracked layer's P_in and P_out are
the top eigenvectors of its input and output-gradient covariances, as LoGra's PCA initialisation
(Choe et al. 2024).

Why they suit influence: with EK-FAC's Kronecker eigenbasis ``Q_S ⊗ Q_A`` of the Fisher F (the
eigenvectors of ``S = E[δ δᵀ]`` and ``A = E[a aᵀ]``), a score is ``Σ_j g_test,j g_i,j / (σ_j + λ)``
over directions j, and a gradient's energy in direction j is about σ_j, so a direction contributes
about σ_j / (σ_j + λ): near 1 for σ_j ≫ λ, σ_j / λ below. Keeping the directions of the largest
σ_S·σ_A keeps what the scores are made of (as Arnoldi influence keeps the top Hessian eigenvectors,
Schioppa et al. 2022) instead of a random mixture of all of them. The columns are orthonormal and
not rescaled: a projected row is the gradient's exact coordinates in the kept directions, so λ
keeps its meaning.

Per group of a grouped convolution, P_in's rows of group j (``P_in.view(g, d_in [+1], k_in)[j]``)
are that group's own eigenvectors, and likewise P_out's. The covariances come from one capture
pass over ``x`` (the first :data:`PCA_SAMPLES` training points in a build), every rank of a
distributed build uses rank 0's bases, and the run saves them (:data:`BASES_FILE`) so that queries
project test points into the same space.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import ModelError
from ..ihvp.ekfac import CovarianceAccumulator, capture_batches, group_name, unprojected_layout
from ..models.losses import LossFn
from .capture import Captures, capture, model_dtype
from .kronecker import KroneckerProjector

__all__ = ["BASES_FILE", "PCA_MACS_PER_S", "PCA_SAMPLES", "bases_from_tensors", "bases_to_tensors", "covariance_macs",
           "pca_bases", "pca_sample_count", "top_eigenvectors"]

PCA_SAMPLES = 1024  # at most this many training points' layer covariances give the bases
PCA_MIN_SAMPLES = 128  # and at least this many (or all), whatever the budget
PCA_BUDGET = 5e11  # multiply-adds of the covariance products (about 35 s on one CPU core, float32)
PCA_MACS_PER_S = 1.4e10  # the plan's estimate of their rate (PCA_BUDGET in about 35 s)
BASES_FILE = "projection.pt"  # in the run folder, for a store with PCA bases
DENSE_EIGH_MAX = 2048  # above this dimension (and k well below it) a randomised eigensolver
SAMPLES_KEY = "basis_samples"  # in the bases file: how many training points gave them
CHUNK = 16  # samples per capture while accumulating the covariances (raw, unfolded captures)


def top_eigenvectors(cov: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """The k leading eigenvectors (d, k) of a symmetric PSD ``cov`` (d, d), float64, orthonormal,
    by decreasing eigenvalue, each signed so that its largest-magnitude entry is positive.
    Dense ``eigh`` up to :data:`DENSE_EIGH_MAX` (or k > d/4); above, subspace iteration on 2k + 16
    vectors (12 rounds) then Rayleigh–Ritz: O(d²k) instead of O(d³); its error in the kept span
    shrinks as (σ_{2k+17}/σ_k)^12, small for the fast-decaying spectra of layer covariances."""
    c = cov.to(torch.float64)
    d = c.shape[0]
    if not 0 < k <= d:
        raise ValueError(f"k must be in 1..{d}, got {k}")
    if d <= DENSE_EIGH_MAX or 4 * k > d:
        _, vecs = torch.linalg.eigh(c)  # ascending
        top = vecs[:, -k:].flip(1)  # (d, k)
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        q = torch.randn(d, min(d, 2 * k + 16), generator=gen, dtype=torch.float64).to(c.device)
        for _ in range(12):
            q, _ = torch.linalg.qr(c @ q)  # (d, k + 16)
        _, vecs = torch.linalg.eigh(q.T @ c @ q)
        top = (q @ vecs)[:, -k:].flip(1)  # (d, k)
    pivot = top[top.abs().argmax(0), torch.arange(k)]  # (k,) each column's largest entry
    return top * torch.where(pivot < 0, -1.0, 1.0)


def covariance_macs(caps: Captures) -> int:
    """Multiply-adds a sample costs the layer covariances of ``caps`` (one capture): Σ over
    layers (and groups) of positions·(d_in² + d_out²)."""
    return sum(a.shape[1] * (a.shape[-1] ** 2 + delta.shape[-1] ** 2) for _, a, delta in capture_batches(caps))


def pca_sample_count(n: int, per_sample: int, *, budget: float | None = None) -> int:
    """Training points the bases use: as many of the first n as ``budget`` multiply-adds
    (default :data:`PCA_BUDGET`) allow at ``per_sample`` each, at least :data:`PCA_MIN_SAMPLES`,
    at most :data:`PCA_SAMPLES` (and n)."""
    budget = PCA_BUDGET if budget is None else budget
    return min(n, PCA_SAMPLES, max(PCA_MIN_SAMPLES, int(budget // max(per_sample, 1))))


def pca_bases(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *,
              projector: KroneckerProjector, budget: float | None = None,
              progress: Callable[[int, int], None] | None = None
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per Kronecker layer of ``projector`` (its split fixes k_out, k_in): (P_out (g·d_out, k_out),
    P_in (g·(d_in [+1]), k_in)), the top eigenvectors of each group's ``S = Σ δ δᵀ`` and
    ``A = Σ a aᵀ`` over every position of the samples (raw captures, the model in eval mode).
    The samples: the first of x (n, ...), y (n,), as many as ``budget`` multiply-adds of the
    covariance products allow (Σ over layers of positions·(d_in² + d_out²) a sample, counted on
    the first chunk), at least :data:`PCA_MIN_SAMPLES`: all 1,024 for the Fashion-MNIST cnn,
    about 128 for an 11M-parameter ResNet-18 on 32×32 images (5.4 G a sample).
    ``progress(done, total)`` after each chunk. The number used is ``projector.basis_samples``."""
    selection = projector.selection
    cov = CovarianceAccumulator(unprojected_layout(selection.kronecker), dtype=model_dtype(model))
    total = len(x)
    for start in range(0, len(x), CHUNK):
        if start >= total:
            break
        caps = capture(model, loss_fn, x[start : start + CHUNK], y[start : start + CHUNK], selection=selection)
        for name, a, delta in capture_batches(caps):  # products in the model's dtype, sums in float64
            cov.update(name, a, delta)
        if start == 0:  # the first chunk's shapes give a sample's cost, and so the sample count
            total = pca_sample_count(len(x), covariance_macs(caps), budget=budget)
        if progress is not None:
            progress(min(start + CHUNK, total), total)
    projector.basis_samples = min(total, len(x))
    out = {}
    for index, layer in enumerate(selection.kronecker):
        k_out, k_in = projector.factors(layer.name)
        seed = projector.seed * 1_000_003 + 3 * index
        groups = [cov.covariances(group_name(layer.name, j, layer.groups)) for j in range(layer.groups)]
        p_out = torch.cat([top_eigenvectors(s, k_out, seed=seed) for _, s in groups])  # (g·d_out, k_out)
        p_in = torch.cat([top_eigenvectors(a, k_in, seed=seed + 1) for a, _ in groups])  # (g·(d_in [+1]), k_in)
        out[layer.name] = (p_out, p_in)
    return out


def bases_to_tensors(bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                     samples: int | None = None) -> dict[str, torch.Tensor]:
    """A flat dict ``{"<layer>/out": P_out, "<layer>/in": P_in}`` of CPU tensors (for save_tensors),
    with ``basis_samples`` (the training points behind them) when given."""
    out = {} if samples is None else {SAMPLES_KEY: torch.tensor(int(samples))}
    for name, (p_out, p_in) in bases.items():
        out[f"{name}/out"] = p_out.detach().cpu().contiguous()
        out[f"{name}/in"] = p_in.detach().cpu().contiguous()
    return out


def bases_from_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of :func:`bases_to_tensors` (without ``basis_samples``)."""
    names = {key.rsplit("/", 1)[0] for key in tensors if key != SAMPLES_KEY}
    try:
        return {name: (tensors[f"{name}/out"], tensors[f"{name}/in"]) for name in names}
    except KeyError as exc:
        raise ModelError(f"the saved Kronecker bases lack {exc}") from exc
