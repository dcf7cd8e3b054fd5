"""The dense Hessian of the mean data loss, ``∇²θ[(1/n) Σ_i L(z_i, θ)]`` (p, p), plus ``shift``·I.

Two ways to the same matrix:

- **Closed form for linear models** (``logreg``, ``svm``, any ``Sequential(Flatten, Linear)``):
  the logits are ``f_i = W x_i + b``, linear in θ, so the Hessian has no second-derivative term of
  the model and factors per sample into the loss's curvature in the logits times the input's
  outer product (Kronecker structure)::

      H = (1/n) Σ_i Λ_i ⊗ x̃_i x̃_iᵀ,   Λ_i = ∇²_f L(f_i, y_i) (C, C),   x̃_i = [x_i; 1] (D+1,)

  in the order (class, input feature) of the augmented weight ``[W b]``, permuted into
  ``named_parameters()`` order (weight row-major, then bias). Λ_i is taken with ``torch.func`` from
  the objective's own loss, so cross-entropy and the smooth hinge need no special code. Cost
  ``O(n · C² · D²)`` with the symmetric halves skipped: ~10 ms for digits' 650 parameters, against
  ~0.3 s for 650 Hessian-vector products.
- **Any other model**: the HVP-assembled matrix (:func:`~engine.ihvp.hvp.dense_hessian` of
  :func:`~engine.ihvp.hvp.full_hvp`), the reference the closed form is tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.func import jacrev, vmap

from ..models.objective import Objective
from .hvp import dense_hessian, full_hvp

__all__ = [
    "GATHER_ELEMENTS",
    "OUTER_BUDGET",
    "data_hessian",
    "full_hessian",
    "linear_hessian",
    "linear_layer",
    "with_shift",
]

OUTER_BUDGET = 1 << 24  # elements of per-sample outer products held at once (128 MiB in float64)
GATHER_ELEMENTS = 1 << 22  # Hessian entries placed per gather (and the largest cached map)


def linear_layer(objective: Objective) -> nn.Linear | None:
    """The one ``nn.Linear`` of a model whose logits are ``Linear(flatten(x))`` with every
    trainable parameter in that layer (weight, then bias if any); None for any other model."""
    model = objective.model
    if not objective.functional or not isinstance(model, nn.Sequential):
        return None
    layers = list(model.children())
    if not layers or not isinstance(layers[-1], nn.Linear):
        return None
    if any(not (isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1) for m in layers[:-1]):
        return None
    last = f"{len(layers) - 1}."
    expect = [last + "weight"] + ([last + "bias"] if layers[-1].bias is not None else [])
    return layers[-1] if objective.names == expect else None


def _pairs(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i ≤ j) of a k × k upper triangle, row-major (``torch.triu_indices``)."""
    iu = torch.triu_indices(k, k, device=device)
    return iu[0], iu[1]


def _pair_index(i: torch.Tensor, j: torch.Tensor, k: int) -> torch.Tensor:
    """Position of the pair (min(i, j), max(i, j)) in :func:`_pairs` ``(k)`` order."""
    lo, hi = torch.minimum(i, j), torch.maximum(i, j)
    return lo * k - lo * (lo - 1) // 2 + (hi - lo)


def _gather_rows(n_classes: int, d: int, bias: bool, start: int, stop: int) -> torch.Tensor:
    """(stop − start, p) positions into the flattened (K, F) pair table ``T[(c ≤ c'), (a ≤ b)]``
    of Hessian rows ``start:stop`` in ``named_parameters()`` order (weight row-major (c, a),
    then bias c, which is input feature a = D of the augmented x̃)."""
    d1 = d + bias
    idx = torch.arange(n_classes * d + (n_classes if bias else 0))
    cls = torch.where(idx < n_classes * d, idx // d, idx - n_classes * d)  # (p,)
    feat = torch.where(idx < n_classes * d, idx % d, torch.full_like(idx, d))  # (p,)
    k = _pair_index(cls[start:stop, None], cls[None, :], n_classes)  # (b, p)
    f = _pair_index(feat[start:stop, None], feat[None, :], d1)  # (b, p)
    return k * (d1 * (d1 + 1) // 2) + f


_gather_cached = functools.lru_cache(maxsize=8)(_gather_rows)  # whole maps of small models


def _assemble(table: torch.Tensor, n_classes: int, d: int, bias: bool) -> torch.Tensor:
    """The (p, p) Hessian from its (K, F) pair table: one gather with a cached map when
    p² ≤ GATHER_ELEMENTS, else row blocks of that many entries with maps made on the fly."""
    p = n_classes * d + (n_classes if bias else 0)
    flat = table.reshape(-1)
    if p * p <= GATHER_ELEMENTS:
        return flat[_gather_cached(n_classes, d, bias, 0, p).to(flat.device)]
    out = flat.new_empty(p, p)
    step = max(1, GATHER_ELEMENTS // p)
    for s in range(0, p, step):
        rows = slice(s, min(s + step, p))
        out[rows] = flat[_gather_rows(n_classes, d, bias, rows.start, rows.stop).to(flat.device)]
    return out


def linear_hessian(objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                   budget: int = OUTER_BUDGET) -> torch.Tensor:
    """∇²θ of the mean data loss (p, p) for a model :func:`linear_layer` accepts, in closed form.

    Per chunk of samples: the logits, their loss curvature Λ_i for the class pairs c ≤ c'
    (``lam`` (b, K)), the upper-triangular outer products x̃_ia x̃_ib, a ≤ b (``outer`` (b, F)),
    and one product ``lamᵀ outer`` (K, F) added to the pair table; chunks hold at most
    ``budget`` elements of either. The table is then spread into H's (p, p) layout.
    """
    layer = linear_layer(objective)
    if layer is None:
        raise ValueError("linear_hessian needs a Sequential(Flatten, Linear) model")
    n_classes, d = layer.weight.shape
    bias = layer.bias is not None
    n = len(x)
    d1 = d + bias
    width = d1 * (d1 + 1) // 2  # F
    w = theta[: n_classes * d].view(n_classes, d)
    y = y.to(objective.device)
    ca, cb = _pairs(n_classes, objective.device)  # class pairs c ≤ c' (Λ symmetric)

    def loss_one(f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return objective.loss_fn(f.unsqueeze(0), t.unsqueeze(0))

    # reverse over reverse: forward mode's first use costs ~0.1 s of one-off decomposition setup
    curvature = vmap(jacrev(jacrev(loss_one)))
    table = theta.new_zeros(len(ca), width)  # (K, F)
    step = max(1, budget // max(width, n_classes * n_classes))
    for s in range(0, n, step):
        xs = objective.as_input(x[s : s + step]).reshape(-1, d)  # (b, D)
        logits = xs @ w.T  # (b, C)
        if bias:
            logits = logits + theta[n_classes * d :]
            xs = torch.cat([xs, xs.new_ones(len(xs), 1)], 1)  # (b, D+1) = x̃
        lam = curvature(logits, y[s : s + step])[:, ca, cb] / n  # (b, K): Λ_i[c, c'] / n
        outer = xs.new_empty(len(xs), width)  # (b, F): x̃_ia x̃_ib for a ≤ b, row-major
        start = 0
        for a in range(d1):
            torch.mul(xs[:, a:], xs[:, a : a + 1], out=outer[:, start : start + d1 - a])
            start += d1 - a
        table += lam.T @ outer
    return _assemble(table, n_classes, d, bias)


def data_hessian(objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """∇²θ of the mean data loss over (x, y), (p, p), no shift: closed form for linear models,
    else assembled from Hessian-vector products (``progress`` gets the columns done)."""
    if linear_layer(objective) is not None:
        h = linear_hessian(objective, theta, x, y)
        if progress is not None:
            progress(objective.n_params)
        return h
    hvp = full_hvp(objective, theta, x, y, shift=0.0)
    return dense_hessian(hvp, objective.n_params, dtype=theta.dtype, device=theta.device,
                         progress=progress)


def full_hessian(objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                 shift: float, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``H = ∇²θ[(1/n) Σ_i L(z_i, θ)] + shift·I`` (p, p), symmetric; ``shift`` is λ + δ."""
    h = data_hessian(objective, theta, x, y, progress=progress)
    return with_shift(h, shift)


def with_shift(h: torch.Tensor, shift: float) -> torch.Tensor:
    """``½(h + hᵀ) + shift·I``: a data-loss Hessian made exactly symmetric and shifted."""
    out = 0.5 * (h + h.T)
    out.diagonal().add_(shift)
    return out
