"""Kronecker-factored random projection of per-layer gradients (LoGra, Choe et al. 2024).

Each tracked Kronecker layer l gets seeded random matrices P_in (g·(d_in [+1]), k_in) and
P_out (g·d_out, k_out): orthonormalised Gaussian columns scaled by √(rows/k), so E[P Pᵀ] = I and
``E‖P_outᵀ G P_in‖² = ‖G‖²`` like the dense projection's N(0, 1/K) entries. Orthonormal rather
than plain Gaussian because layer factors are small: a plain Gaussian P_out (10, 10) for a
10-class head distorts inner products by ~√(2/10), an orthonormal one not at all. Its projected gradient ``vec(P_outᵀ G_i P_in)`` (k_out·k_in, row-major)
is computed from the projected captures without forming G_i::

    P_outᵀ G_i P_in = Σ_s (P_outᵀ δ_s)(P_inᵀ a_s)ᵀ = δ̃ᵀ ã        (k_out, s)·(s, k_in)

A grouped convolution's G is block-diagonal; group j uses rows j of P_in and P_out. The exact
modules' (normalisation affine) gradients, concatenated in selection order, get one dense
P_exact (p_exact, k_exact) of the same kind, or are kept whole when their share of K reaches their size.

Split of K (deterministic, recorded by :meth:`KroneckerProjector.split`): every block first gets
one dimension; the rest is shared in proportion to the blocks' parameter counts, capped at each
block's size (water-filling); a layer's share t becomes k_out·k_in ≤ t with k_out ≈ k_in (ratio within
a factor 2 of the square, each ≤ its dimension); what the rounding leaves is given back to the
largest layers, then to the exact block. ``k`` is the total, at most the requested K (less only
when the tracked parameters cannot fill it). With ``weights`` (e.g. each block's mean squared
per-sample gradient norm, :func:`engine.grads.layerwise.gradient_energy`) shares follow the
weights instead of the parameter counts: the variance of a block's projected inner products
scales as ‖G_l‖⁴/k_l, so k_l ∝ ‖G_l‖² minimises the total. On a ResNet-18 (width 16, random
init) at K = 1024 the Gram matrix of projected gradients correlates 0.85 with the exact one by
parameter count and 0.98 by energy (a dense Gaussian: 0.996), the 10-class head holding 60% of
the gradient energy in 0.7% of the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .capture import Captures, LayerCapture, padded_input
from .layers import Selection, TrackedLayer

__all__ = ["EXACT_BLOCK", "SPLIT_RULE", "WEIGHTED_RULE", "KroneckerProjector"]

EXACT_BLOCK = "<exact>"
SPLIT_RULE = ("one dimension per block, the rest in proportion to parameter count capped at the "
              "block's size; per layer k_out*k_in <= share with k_out ~ k_in; leftovers to the "
              "largest layers, then the exact block")
WEIGHTED_RULE = SPLIT_RULE.replace("parameter count", "the given block weights")


def _water_fill(sizes: list[float], caps: list[int], total: int) -> list[float]:
    """Shares ∝ sizes summing to ``total`` (≤ Σ caps), none above its cap."""
    shares = [0.0] * len(sizes)
    free = set(range(len(sizes)))
    left = float(total)
    while free:
        weight = sum(sizes[i] for i in free)
        over = [i for i in free if left * sizes[i] / weight >= caps[i]]
        if not over:
            for i in free:
                shares[i] = left * sizes[i] / weight
            break
        for i in over:
            shares[i] = float(caps[i])
            left -= caps[i]
            free.discard(i)
    return shares


def _factors(t: int, rows_out: int, rows_in: int) -> tuple[int, int]:
    """(k_out, k_in) with the largest product ≤ t, k_out ≤ rows_out, k_in ≤ rows_in and the
    ratio k_out/k_in within a factor 2 of the balanced one (square unless a dimension caps it),
    ties to the more balanced pair."""
    ideal_out = min(float(rows_out), max(math.sqrt(t), t / rows_in, 1.0))
    ratio = ideal_out / max(1.0, t / ideal_out)
    best, best_key = (1, 1), (1, -math.inf)
    for k_out in range(max(1, math.floor(ideal_out / 2)), min(rows_out, math.ceil(2 * ideal_out)) + 1):
        k_in = min(rows_in, t // k_out)
        off = abs(math.log(k_out / max(k_in, 1) / ratio))
        if k_in < 1 or off > math.log(2) + 1e-9:
            continue
        key = (k_out * k_in, -off)
        if key > best_key:
            best, best_key = (k_out, k_in), key
    return best


def _random_basis(rows: int, cols: int, *, seed: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """P = √(rows/cols)·Q (rows, cols): Q the orthonormalised columns of a Gaussian matrix from a
    CPU generator seeded by ``seed`` (Haar-distributed), so E[P Pᵀ] = I as for N(0, 1/cols)
    entries, and a factor as wide as its dimension is an exact rotation."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    q = q * torch.where(r.diagonal() < 0, -1.0, 1.0)  # unique signs: Haar, not LAPACK's choice
    return (q * math.sqrt(rows / cols)).to(device=device, dtype=dtype)  # (rows, cols)


class KroneckerProjector:
    """Per-layer Kronecker projection of a :class:`Selection`'s gradients to ``k`` columns.

    ``k``: requested total K; ``seed``: the matrices are a function of (seed, layer index) and
    the selection only; ``dtype``/``device``: where the matrices live and the projection runs
    (the model's). Output columns: the Kronecker layers in selection order, each
    ``vec(P_outᵀ G P_in)`` (k_out·k_in), then the exact block (k_exact).
    """

    def __init__(self, selection: Selection, k: int, *, seed: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu",
                 weights: Mapping[str, float] | None = None,
                 bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.selection = selection
        self.requested_k = int(k)
        self.seed = int(seed)
        self.weights = None if weights is None else self._block_weights(weights)
        self.dtype = dtype
        self.device = torch.device(device)
        self._layers = {layer.name: layer for layer in selection.kronecker}
        self._factors, self.k_exact = self._split_k()
        self.p_exact = sum(layer.numel for layer in selection.exact)
        self.offsets: dict[str, int] = {}
        pos = 0
        for layer in selection.kronecker:
            self.offsets[layer.name] = pos
            pos += self._factors[layer.name][0] * self._factors[layer.name][1]
        self.offsets[EXACT_BLOCK] = pos
        self.k = pos + self.k_exact
        self._mats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._convs: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._exact: torch.Tensor | None = None
        self.basis = "random"
        self.basis_samples: int | None = None  # training points behind pca bases, when known
        if bases is not None:
            self.set_bases(bases)

    @classmethod
    def from_split(cls, selection: Selection, split: Mapping[str, object], *,
                   dtype: torch.dtype, device: torch.device | str = "cpu",
                   bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                   ) -> KroneckerProjector:
        """The projector a recorded :meth:`split` describes (same K, seed, weights: same P; a
        split with ``basis`` "pca" needs its saved ``bases``)."""
        if split.get("basis", "random") == "pca" and bases is None:
            raise ModelError("this Kronecker store was projected on data-aware (pca) bases, and "
                             "they were not given (the run's bases file is missing)")
        proj = cls(selection, int(split["requested_k"]), seed=int(split["seed"]),  # type: ignore[call-overload]
                   dtype=dtype, device=device, weights=split.get("weights"),  # type: ignore[arg-type]
                   bases=bases if split.get("basis", "random") == "pca" else None)
        if proj.split()["blocks"] != split["blocks"]:
            raise ModelError("the recorded Kronecker split does not match this model's layers")
        return proj

    def set_bases(self, bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Use the given (P_out (g·d_out, k_out), P_in (g·(d_in [+1]), k_in)) of every Kronecker
        layer instead of the seeded random ones (e.g. :func:`engine.grads.pca.pca_bases`)."""
        mats = {}
        for layer in self.selection.kronecker:
            if layer.name not in bases:
                raise ModelError(f"no Kronecker basis for layer {layer.name!r}")
            p_out, p_in = bases[layer.name]
            ko, ki = self._factors[layer.name]
            if tuple(p_out.shape) != (layer.out_rows, ko) or tuple(p_in.shape) != (layer.in_rows, ki):
                raise ModelError(f"the Kronecker basis of {layer.name!r} has shapes {tuple(p_out.shape)}, "
                                 f"{tuple(p_in.shape)}; this split needs ({layer.out_rows}, {ko}), "
                                 f"({layer.in_rows}, {ki})")
            mats[layer.name] = (p_out.to(self.device, self.dtype), p_in.to(self.device, self.dtype))
        self._mats, self._convs, self.basis = mats, {}, "pca"

    # ---------------------------------------------------------------- the split
    def _block_weights(self, weights: Mapping[str, float]) -> dict[str, float]:
        """Per block weight: Kronecker layers by name, the exact block as EXACT_BLOCK or the sum
        over its modules' names."""
        out: dict[str, float] = {}
        for layer in self.selection.kronecker:
            if layer.name not in weights:
                raise ModelError(f"no split weight for layer {layer.name!r}")
            out[layer.name] = float(weights[layer.name])
        if self.selection.exact:
            out[EXACT_BLOCK] = float(weights[EXACT_BLOCK]) if EXACT_BLOCK in weights else sum(
                float(weights[layer.name]) for layer in self.selection.exact)
        return out

    def _split_k(self) -> tuple[dict[str, tuple[int, int]], int]:
        kron = list(self.selection.kronecker)
        p_exact = sum(layer.numel for layer in self.selection.exact)
        sizes = [layer.numel for layer in kron] + ([p_exact] if p_exact else [])
        n = len(sizes)
        total = min(self.requested_k, sum(sizes))
        if total < n:
            raise ModelError(f"--project {self.requested_k} is below the {n} tracked blocks "
                             f"(one dimension each at least); ask for more or track fewer")
        names = [layer.name for layer in kron] + ([EXACT_BLOCK] if p_exact else [])
        tiny = 1e-12 * max(self.weights.values(), default=1.0) if self.weights else 0.0
        score = sizes if self.weights is None else [max(self.weights[b], tiny) for b in names]
        shares = [1 + s for s in _water_fill(score, [c - 1 for c in sizes], total - n)]
        factors = {layer.name: _factors(math.floor(t + 1e-9), layer.out_rows, layer.in_rows)
                   for layer, t in zip(kron, shares)}
        k_exact = min(p_exact, math.floor(shares[-1] + 1e-9)) if p_exact else 0
        left = total - k_exact - sum(a * b for a, b in factors.values())
        changed = True
        while left > 0 and changed:
            changed = False
            for layer in sorted(kron, key=lambda lay: -lay.numel):
                ko, ki = factors[layer.name]
                new = _factors(ko * ki + left, layer.out_rows, layer.in_rows)
                if new[0] * new[1] > ko * ki:
                    left -= new[0] * new[1] - ko * ki
                    factors[layer.name] = new
                    changed = True
                if left == 0:
                    break
        k_exact += min(left, p_exact - k_exact)
        return factors, k_exact

    @property
    def exact_whole(self) -> bool:
        """Whether the exact modules' gradients are kept whole (no P_exact)."""
        return self.k_exact == self.p_exact

    def split(self) -> dict[str, object]:
        """JSON-able record of the projection: K, seed, rule and one entry per block."""
        blocks: list[dict[str, object]] = []
        for layer in self.selection.kronecker:
            ko, ki = self._factors[layer.name]
            blocks.append({"name": layer.name, "kind": "kronecker", "k_out": ko, "k_in": ki,
                           "k": ko * ki, "offset": self.offsets[layer.name],
                           "rows_out": layer.out_rows, "rows_in": layer.in_rows,
                           "params": layer.numel, "groups": layer.groups, "bias": layer.bias})
        if self.p_exact:
            blocks.append({"name": EXACT_BLOCK, "kind": "exact",
                           "modules": [layer.name for layer in self.selection.exact],
                           "k": self.k_exact, "offset": self.offsets[EXACT_BLOCK],
                           "params": self.p_exact, "whole": self.exact_whole})
        return {"projection": "kronecker", "requested_k": self.requested_k, "k": self.k,
                "seed": self.seed, "rule": SPLIT_RULE if self.weights is None else WEIGHTED_RULE,
                "weights": self.weights, "blocks": blocks, "basis": self.basis,
                **({"basis_samples": self.basis_samples} if self.basis_samples else {})}

    # ---------------------------------------------------------------- the matrices
    def factors(self, name: str) -> tuple[int, int]:
        """(k_out, k_in) of a Kronecker layer."""
        return self._factors[name]

    def matrices(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_out (g·d_out, k_out), P_in (g·(d_in [+1]), k_in)) of a Kronecker layer."""
        if name not in self._mats:
            index = [layer.name for layer in self.selection.kronecker].index(name)
            layer = self._layers[name]
            ko, ki = self._factors[name]
            base = self.seed * 1_000_003 + 3 * index
            kw = {"dtype": self.dtype, "device": self.device}
            self._mats[name] = (_random_basis(layer.out_rows, ko, seed=base, **kw),
                                _random_basis(layer.in_rows, ki, seed=base + 1, **kw))
        return self._mats[name]

    def exact_matrix(self) -> torch.Tensor | None:
        """P_exact (p_exact, k_exact), or None when the exact block is kept whole."""
        if self.exact_whole:
            return None
        if self._exact is None:
            self._exact = _random_basis(self.p_exact, self.k_exact, seed=self.seed * 1_000_003 - 1,
                                    dtype=self.dtype, device=self.device)
        return self._exact

    def _conv_weight(self, layer: TrackedLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """P_in as a convolution: weight (g·k_in, C_in/g, kh, kw), bias (g·k_in,) or None."""
        if layer.name not in self._convs:
            _, p_in = self.matrices(layer.name)
            ki, g = self._factors[layer.name][1], layer.groups
            blocks = p_in.view(g, layer.d_in + int(layer.bias), ki)  # (g, d_in [+1], k_in)
            w = blocks[:, : layer.d_in].permute(0, 2, 1).reshape(g * ki, -1)  # (g·k_in, d_in)
            bias = blocks[:, -1].reshape(g * ki) if layer.bias else None  # (g·k_in,)
            self._convs[layer.name] = (w.contiguous(), bias)
        return self._convs[layer.name]

    # ---------------------------------------------------------------- projecting captures
    def project_input(self, layer: TrackedLayer, module: nn.Module, x: torch.Tensor
                      ) -> torch.Tensor:
        """ã = P_inᵀ a (b, s·g, k_in) straight from the layer's input x, never unfolded: for a
        Conv2d it is a convolution of x with P_in's columns as k_in filters per group."""
        ki = self._factors[layer.name][1]
        b = x.shape[0]
        if layer.conv:
            conv: nn.Conv2d = module  # type: ignore[assignment]
            w, bias = self._conv_weight(layer)
            xp, padding = padded_input(conv, x)
            out = F.conv2d(xp, w.view(w.shape[0], -1, *conv.kernel_size), bias, conv.stride,
                           padding, conv.dilation, layer.groups)  # (b, g·k_in, H', W')
            if layer.groups == 1:
                return out.view(b, ki, -1).transpose(1, 2)  # (b, L, k_in), a view
            out = out.reshape(b, layer.groups, ki, -1).permute(0, 3, 1, 2)  # (b, L, g, k_in)
            return out.reshape(b, -1, ki)  # (b, L·g, k_in)
        _, p_in = self.matrices(layer.name)
        a = x.reshape(b, -1, x.shape[-1])  # (b, s, d_in)
        out = a @ p_in[: layer.d_in]  # (b, s, k_in)
        return out + p_in[-1] if layer.bias else out

    def project_output_grad(self, layer: TrackedLayer, delta: torch.Tensor) -> torch.Tensor:
        """δ̃ = P_outᵀ δ (b, s·g, k_out) from the output gradient, (b, C_out, H', W') for a
        Conv2d or (b, ..., d_out) for a Linear layer."""
        p_out, _ = self.matrices(layer.name)
        b, g = delta.shape[0], layer.groups
        if not layer.conv:
            return delta.reshape(b, -1, delta.shape[-1]) @ p_out  # (b, s, k_out)
        if g == 1:  # P_outᵀ δ as (b, k_out, L), returned as a (b, L, k_out) view
            return torch.matmul(p_out.T, delta.reshape(b, layer.d_out, -1)).transpose(1, 2)
        d = delta.reshape(b, g, layer.d_out, -1)  # (b, g, d_out, L)
        out = torch.einsum("bgol,gok->blgk", d, p_out.view(g, layer.d_out, -1))  # (b,L,g,k_out)
        return out.reshape(b, -1, out.shape[-1])  # (b, L·g, k_out)

    def project_captures(self, captures: Captures) -> Captures:
        """Raw captures (a (b, s, g, d_in [+1]), δ (b, s, g, d_out)) → projected (ã, δ̃)."""
        if captures.projected:
            return captures
        kron = {}
        for name, lc in captures.kron.items():
            layer = self._layers[name]
            p_out, p_in = self.matrices(name)
            g, b = layer.groups, captures.batch
            a = torch.einsum("bsgd,gdk->bsgk", lc.a, p_in.view(g, -1, p_in.shape[1]))
            d = torch.einsum("bsgd,gdk->bsgk", lc.delta, p_out.view(g, -1, p_out.shape[1]))
            kron[name] = LayerCapture(a.reshape(b, -1, a.shape[-1]), d.reshape(b, -1, d.shape[-1]))
        return Captures(kron, captures.exact, True, captures.batch)

    def project(self, captures: Captures) -> torch.Tensor:
        """Projected per-sample gradients (b, k): per layer ``vec(δ̃ᵀ ã)`` = vec(P_outᵀ G P_in),
        then the exact block ``[dγ, dβ, ...] P_exact`` (or whole)."""
        cap = self.project_captures(captures)
        b = cap.batch
        out = torch.empty(b, self.k, dtype=self.dtype, device=self.device)
        for layer in self.selection.kronecker:
            lc = cap.kron[layer.name]
            start = self.offsets[layer.name]
            block = torch.bmm(lc.delta.transpose(1, 2), lc.a)  # (b, k_out, k_in)
            out[:, start : start + block[0].numel()] = block.reshape(b, -1)
        if self.p_exact:
            g = torch.cat([cap.exact[layer.name] for layer in self.selection.exact], 1)  # (b, p_e)
            p = self.exact_matrix()
            out[:, self.offsets[EXACT_BLOCK] :] = g if p is None else g @ p  # (b, k_exact)
        return out
