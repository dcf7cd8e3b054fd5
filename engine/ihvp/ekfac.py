"""EK-FAC factors (George et al. 2018), fitted as kronfluence fits them, from layer inputs and
output gradients (tensors, no model).

A tracked layer's per-sample gradient is ``G_i = Σ_s δ_{i,s} a_{i,s}ᵀ`` (d_out, d_in), from its
inputs a_i (s, d_in) and the output gradients δ_i (s, d_out) of the per-sample data loss over
positions s (tokens; unfolded patches of a convolution). Fed the Kronecker-projected ã = P_inᵀa,
δ̃ = P_outᵀδ instead, everything below holds for ``G̃_i = P_outᵀ G_i P_in`` (k_out, k_in).

1. Covariances, averaged over every position of every sample (kronfluence's
   ``CovarianceTracker``; count = Σ b·s): ``A = Σ_{i,s} a aᵀ / N_pos`` (d_in, d_in),
   ``S = Σ_{i,s} δ δᵀ / N_pos`` (d_out, d_out).
2. Eigenbases, from the symmetrised covariances in float64 (``perform_eigendecomposition``):
   ``A = Q_A diag(σ_A) Q_Aᵀ``, ``S = Q_S diag(σ_S) Q_Sᵀ``.
3. Eigenvalue correction, averaged over samples (``LambdaTracker``; count = n):
   ``Λ = (1/n) Σ_i (Q_Sᵀ G_i Q_A)²`` (d_out, d_in), elementwise square. ``Q_Sᵀ G_i Q_A`` is formed
   as ``Σ_s (Q_Sᵀδ_{i,s})(Q_Aᵀa_{i,s})ᵀ`` or by rotating G_i, whichever costs fewer flops, for a
   few samples at a time.

Λ is the diagonal of the empirical Fisher ``(1/n) Σ_i vec(G_i) vec(G_i)ᵀ`` in the basis
``Q_S ⊗ Q_A`` (row-major vec of (d_out, d_in) blocks: ``vec(Q_S C Q_Aᵀ) = (Q_S ⊗ Q_A) vec(C)``).
The scale of A and S therefore never matters, only their eigenvectors. Coordinates of the store
outside every layer block (biases or norm affines tracked exactly) get the same correction in
the identity basis: ``E_i[g_ij²]`` (kronfluence's diagonal strategy).

Sums are float64; ``dtype`` sets the dtype of the products (float32 for speed: each batch's
product rounds in float32, the running sums stay float64). The solver lives in
:mod:`engine.ihvp.ekfac_solver`; persistence is the caller's (:func:`factors_to_tensors`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..distributed import Comm

__all__ = ["CovarianceAccumulator", "DiagonalAccumulator", "EKFACFactors", "LambdaAccumulator",
           "LayerBlock", "LayerFactors", "eigenbasis", "factors_from_tensors", "factors_to_tensors",
           "fit_ekfac", "group_name", "layer_layout", "rest_index", "split_groups", "unprojected_layout"]

LAMBDA_CHUNK_ELEMENTS = 1 << 24  # samples × d_out × d_in rotated at once (128 MiB of float64)
Batch = tuple[str, torch.Tensor, torch.Tensor]  # (layer name, a (b, s, d_in), δ (b, s, d_out))


@dataclass(frozen=True)
class LayerBlock:
    """A tracked layer's block of the store's vector: G (d_out, d_in), row-major ``vec(G)`` at
    ``[offset, offset + d_out·d_in)``; or, with ``bias_offset``, G's last column (the bias
    gradient, d_in counting it) at ``[bias_offset, bias_offset + d_out)`` and the weight columns
    ``G[:, :-1]`` row-major at ``[offset, offset + d_out·(d_in − 1))`` (the parameter order of a
    layer's weight then bias in the unprojected space)."""

    name: str
    d_out: int
    d_in: int
    offset: int
    bias_offset: int | None = None

    @property
    def size(self) -> int:
        return self.d_out * self.d_in

    @property
    def contiguous(self) -> bool:
        return self.bias_offset is None

    def index(self) -> torch.Tensor:
        """The store coordinate of each entry of G, row-major: (d_out·d_in,) int64."""
        if self.bias_offset is None:
            return torch.arange(self.offset, self.offset + self.size)
        w = self.offset + torch.arange(self.d_out * (self.d_in - 1)).view(self.d_out, -1)  # (d_out, d_in-1)
        b = self.bias_offset + torch.arange(self.d_out).unsqueeze(1)  # (d_out, 1)
        return torch.cat([w, b], 1).flatten()


def layer_layout(shapes: Iterable[tuple[str, int, int]], *, start: int = 0) -> tuple[LayerBlock, ...]:
    """Consecutive contiguous blocks for ``(name, d_out, d_in)`` in order, the first at ``start``
    (the Kronecker-projected store: ``(name, k_out, k_in)``)."""
    out, offset = [], start
    for name, d_out, d_in in shapes:
        out.append(LayerBlock(name, int(d_out), int(d_in), offset))
        offset += int(d_out) * int(d_in)
    return tuple(out)


def group_name(name: str, group: int, groups: int) -> str:
    """The block name of one group of a grouped layer (the layer's own name when ungrouped)."""
    return name if groups == 1 else f"{name}#{group}"


def unprojected_layout(layers: Iterable[Any]) -> tuple[LayerBlock, ...]:
    """Blocks of the unprojected store for tracked Kronecker layers (``TrackedLayer``-like: name,
    offset, d_out and d_in per group without the bias column, groups, bias): the weight
    ``(g·d_out, d_in)`` row-major at ``offset``, then the bias (g·d_out,); one block per group
    (:func:`group_name`), each G_j (d_out, d_in [+1])."""
    out = []
    for layer in layers:
        g, d_out, d_in, bias = int(layer.groups), int(layer.d_out), int(layer.d_in), bool(layer.bias)
        for j in range(g):
            out.append(LayerBlock(group_name(layer.name, j, g), d_out, d_in + int(bias),
                                  layer.offset + j * d_out * d_in,
                                  layer.offset + g * d_out * d_in + j * d_out if bias else None))
    return tuple(out)


def split_groups(name: str, a: torch.Tensor, delta: torch.Tensor) -> list[Batch]:
    """Raw captures a (b, s, g, d_in [+1]), δ (b, s, g, d_out) of a layer as one batch per group
    block; 3-D captures (b, s, d) pass through."""
    if a.dim() == 3:
        return [(name, a, delta)]
    g = a.shape[2]
    return [(group_name(name, j, g), a[:, :, j], delta[:, :, j]) for j in range(g)]


def capture_batches(caps: Any) -> Iterator[Batch]:
    """A chunk's layer captures (:class:`engine.grads.capture.Captures`) as EK-FAC batches:
    projected (ã, δ̃) per layer as they are, raw (a, δ) one batch per group block."""
    for name, lc in caps.kron.items():
        if caps.projected:
            yield name, lc.a, lc.delta
        else:
            yield from split_groups(name, lc.a, lc.delta)


def _summed_count(comm: Comm, count: int) -> int:
    """``count`` summed over ``comm``'s ranks (a float64 all-reduce: exact for any row count)."""
    return int(comm.all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64)).item())


def rest_index(layout: Sequence[LayerBlock], dim: int) -> torch.Tensor:
    """The store coordinates (r,) int64 that no layer block covers, ascending."""
    covered = torch.zeros(dim, dtype=torch.bool)
    for blk in layout:
        idx = blk.index()
        if idx.min() < 0 or idx.max() >= dim or covered[idx].any():
            raise ValueError(f"layer block {blk.name!r} overlaps another or leaves [0, {dim})")
        covered[idx] = True
    return torch.nonzero(~covered).flatten()


def _positions(x: torch.Tensor, d: int, what: str) -> torch.Tensor:
    """x (b, d) or (b, s, d) as (b, s, d)."""
    x3 = x.unsqueeze(1) if x.dim() == 2 else x
    if x3.dim() != 3 or x3.shape[2] != d:
        raise ValueError(f"{what} must be (b, d) or (b, s, d) with d = {d}, got {tuple(x.shape)}")
    return x3


@dataclass(frozen=True)
class LayerFactors:
    """One layer's EK-FAC factors (float64): eigenvectors Q_A (d_in, d_in), Q_S (d_out, d_out)
    as columns, their covariance eigenvalues σ_A (d_in,), σ_S (d_out,) (ascending), and the
    corrected eigenvalues Λ (d_out, d_in), with the counts they were averaged over."""

    activation_eigenvectors: torch.Tensor
    gradient_eigenvectors: torch.Tensor
    activation_eigenvalues: torch.Tensor
    gradient_eigenvalues: torch.Tensor
    lambda_matrix: torch.Tensor
    num_positions: int  # N_pos of the covariances
    num_samples: int  # n of Λ


@dataclass(frozen=True)
class EKFACFactors:
    """The factors of every tracked layer, the ``layout`` of the store's vector (dim ``dim``),
    and for the coordinates ``rest`` (r,) outside every block their mean square ``rest_diagonal``
    (r,) (empty when the blocks cover the vector)."""

    layout: tuple[LayerBlock, ...]
    layers: dict[str, LayerFactors]
    dim: int
    rest: torch.Tensor
    rest_diagonal: torch.Tensor


class CovarianceAccumulator:
    """Streaming ``A = E[a aᵀ]`` and ``S = E[δ δᵀ]`` per layer, over positions and samples."""

    def __init__(self, layout: Sequence[LayerBlock], *, dtype: torch.dtype = torch.float64,
                 device: torch.device | None = None) -> None:
        self.blocks = {blk.name: blk for blk in layout}
        self.dtype, self.device = dtype, device
        self.a_sum: dict[str, torch.Tensor] = {}
        self.s_sum: dict[str, torch.Tensor] = {}
        self.positions: dict[str, int] = {}

    def update(self, name: str, a: torch.Tensor, delta: torch.Tensor) -> None:
        """Add one batch of layer ``name``: a (b, d_in) or (b, s, d_in), δ likewise with d_out."""
        blk = self.blocks[name]
        a2 = _positions(a, blk.d_in, "a").reshape(-1, blk.d_in)  # (b·s, d_in)
        d2 = _positions(delta, blk.d_out, "δ").reshape(-1, blk.d_out)  # (b·s, d_out)
        if a2.shape[0] != d2.shape[0]:
            raise ValueError(f"a and δ of {name!r} disagree on (b, s)")
        device = self.device or a2.device
        a2, d2 = a2.to(device=device, dtype=self.dtype), d2.to(device=device, dtype=self.dtype)
        if name not in self.a_sum:
            self.a_sum[name] = torch.zeros(blk.d_in, blk.d_in, dtype=torch.float64, device=device)
            self.s_sum[name] = torch.zeros(blk.d_out, blk.d_out, dtype=torch.float64, device=device)
            self.positions[name] = 0
        self.a_sum[name] += a2.T @ a2  # (d_in, d_in)
        self.s_sum[name] += d2.T @ d2  # (d_out, d_out)
        self.positions[name] += a2.shape[0]

    def all_reduce(self, comm: Comm) -> None:
        """Sum every layer's sums and position counts over ``comm``'s ranks (each rank having
        accumulated its own samples; a layer a rank never saw counts as zeros there)."""
        for name, blk in self.blocks.items():
            device = self.device or (self.a_sum[name].device if name in self.a_sum else torch.device("cpu"))
            a = self.a_sum.get(name, torch.zeros(blk.d_in, blk.d_in, dtype=torch.float64, device=device))
            s = self.s_sum.get(name, torch.zeros(blk.d_out, blk.d_out, dtype=torch.float64, device=device))
            self.a_sum[name], self.s_sum[name] = comm.all_reduce_sum(a), comm.all_reduce_sum(s)
            self.positions[name] = _summed_count(comm, self.positions.get(name, 0))

    def covariances(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (d_in, d_in), S (d_out, d_out))`` of layer ``name``, float64, symmetrised."""
        if not self.positions.get(name):
            raise ValueError(f"no batch of layer {name!r} was seen")
        a = self.a_sum[name] / self.positions[name]
        s = self.s_sum[name] / self.positions[name]
        return 0.5 * (a + a.T), 0.5 * (s + s.T)


def eigenbasis(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues (d,) ascending, eigenvectors (d, d) as columns)`` of a symmetric matrix, in
    float64."""
    vals, vecs = torch.linalg.eigh(cov.to(torch.float64))
    return vals, vecs


class LambdaAccumulator:
    """Streaming ``Λ = (1/n) Σ_i (Q_Sᵀ G_i Q_A)²`` per layer, for fixed bases ``{name: (Q_A, Q_S)}``
    (float64; the products run in ``dtype``, the sum in float64)."""

    def __init__(self, bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                 dtype: torch.dtype = torch.float64, device: torch.device | None = None,
                 chunk_elements: int = LAMBDA_CHUNK_ELEMENTS) -> None:
        self.bases = dict(bases)
        self.dtype, self.device, self.chunk_elements = dtype, device, chunk_elements
        self._cast: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}

    def _basis(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._cast:
            q_a, q_s = self.bases[name]
            self._cast[name] = (q_a.to(device=device, dtype=self.dtype),
                                q_s.to(device=device, dtype=self.dtype))
        return self._cast[name]

    def update(self, name: str, a: torch.Tensor, delta: torch.Tensor) -> None:
        """Add one batch of layer ``name``: a (b, d_in) or (b, s, d_in), δ likewise with d_out."""
        q_a, q_s = self.bases[name]
        d_in, d_out = q_a.shape[0], q_s.shape[0]
        a3, d3 = _positions(a, d_in, "a"), _positions(delta, d_out, "δ")  # (b, s, d_in), (b, s, d_out)
        if a3.shape[:2] != d3.shape[:2]:
            raise ValueError(f"a and δ of {name!r} disagree on (b, s)")
        device = self.device or a3.device
        q_a, q_s = self._basis(name, device)
        b, s = a3.shape[:2]
        if name not in self.sums:
            self.sums[name] = torch.zeros(d_out, d_in, dtype=torch.float64, device=device)
            self.samples[name] = 0
        # multiply-adds per sample: rotate a and δ first, or form G_i and rotate it
        rotate_first = s * (d_in * d_in + d_out * d_out + d_out * d_in) <= (
            s * d_out * d_in + d_out * d_in * (d_out + d_in))
        step = max(1, self.chunk_elements // (d_out * d_in))
        for start in range(0, b, step):
            ac = a3[start : start + step].to(device=device, dtype=self.dtype)  # (c, s, d_in)
            dc = d3[start : start + step].to(device=device, dtype=self.dtype)  # (c, s, d_out)
            if rotate_first:
                rot = (dc @ q_s).transpose(1, 2) @ (ac @ q_a)  # (c, d_out, d_in) Q_Sᵀ G_i Q_A
            else:
                g = dc.transpose(1, 2) @ ac  # (c, d_out, d_in) G_i
                rot = q_s.T @ g @ q_a  # (c, d_out, d_in)
            self.sums[name] += rot.square().sum(dim=0, dtype=torch.float64)  # (d_out, d_in)
        self.samples[name] += b

    def update_gradients(self, name: str, g: torch.Tensor) -> None:
        """Add per-sample gradients G_i (b, d_out, d_in) of layer ``name`` directly (the store's
        rows of the layer's block, :func:`fit_ekfac` with ``rows``): ``Q_Sᵀ G_i Q_A``, squared."""
        q_a, q_s = self.bases[name]
        d_in, d_out = q_a.shape[0], q_s.shape[0]
        if g.dim() != 3 or tuple(g.shape[1:]) != (d_out, d_in):
            raise ValueError(f"gradients of {name!r} must be (b, {d_out}, {d_in}), got {tuple(g.shape)}")
        device = self.device or g.device
        q_a, q_s = self._basis(name, device)
        if name not in self.sums:
            self.sums[name] = torch.zeros(d_out, d_in, dtype=torch.float64, device=device)
            self.samples[name] = 0
        step = max(1, self.chunk_elements // (d_out * d_in))
        for start in range(0, g.shape[0], step):
            rot = q_s.T @ g[start : start + step].to(device=device, dtype=self.dtype) @ q_a  # (c, d_out, d_in)
            self.sums[name] += rot.square().sum(dim=0, dtype=torch.float64)  # (d_out, d_in)
        self.samples[name] += g.shape[0]

    def all_reduce(self, comm: Comm) -> None:
        """Sum every layer's Σ_i (Q_Sᵀ G_i Q_A)² and sample count over ``comm``'s ranks."""
        for name, (q_a, q_s) in self.bases.items():
            device = self.device or q_a.device
            total = self.sums.get(name, torch.zeros(q_s.shape[0], q_a.shape[0], dtype=torch.float64,
                                                    device=device))
            self.sums[name] = comm.all_reduce_sum(total)
            self.samples[name] = _summed_count(comm, self.samples.get(name, 0))

    def lambda_matrix(self, name: str) -> torch.Tensor:
        """Λ (d_out, d_in) of layer ``name``, float64."""
        if not self.samples.get(name):
            raise ValueError(f"no batch of layer {name!r} was seen")
        return self.sums[name] / self.samples[name]


class DiagonalAccumulator:
    """Streaming ``E_i[g_ij²]`` (r,) over store rows (b, dim), at the coordinates ``index`` (r,)."""

    def __init__(self, index: torch.Tensor) -> None:
        self.index = index
        self.sum = torch.zeros(len(index), dtype=torch.float64)
        self.samples = 0

    def update(self, rows: torch.Tensor) -> None:
        """Add store rows (b, dim) (or rows already restricted to ``index``, (b, r))."""
        cols = rows if rows.shape[1] == len(self.index) else rows[:, self.index.to(rows.device)]
        self.sum += cols.to(torch.float64).square().sum(dim=0).cpu()  # (r,)
        self.samples += rows.shape[0]

    def all_reduce(self, comm: Comm) -> None:
        """Sum the squares and the row count over ``comm``'s ranks."""
        self.sum = comm.all_reduce_sum(self.sum)
        self.samples = _summed_count(comm, self.samples)

    def diagonal(self) -> torch.Tensor:
        return self.sum / max(self.samples, 1)


def fit_ekfac(batches: Callable[[], Iterable[Batch]] | None, layout: Sequence[LayerBlock], *,
              dim: int | None = None, rest_diagonal: torch.Tensor | None = None,
              rows: Callable[[], Iterable[torch.Tensor]] | None = None,
              covariances: CovarianceAccumulator | None = None,
              captured: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]] | None = None,
              dtype: torch.dtype = torch.float64, device: torch.device | None = None,
              comm: Comm | None = None) -> EKFACFactors:
    """EK-FAC factors: covariances and their eigenbases from one pass over ``batches()`` (an
    iterable of ``(layer name, a (b, s, d_in), δ (b, s, d_out))``), or from ``covariances``
    already accumulated over every sample (e.g. while the store was written), then Λ. Λ comes from
    ``rows()`` when given, an iterable of the store's rows (b, dim) of every sample, each block
    read as G_i (b, d_out, d_in) (no second pass through the model: the store already holds
    ``Σ_s δ aᵀ``, projected or not); otherwise from a second pass over ``batches()`` (which must
    then yield the same data); for the layers in ``captured`` (name → every sample's (a, δ),
    kept by the pass that accumulated ``covariances``) Λ comes from those, rotated before they
    are multiplied (cheaper than rotating G_i when a layer has few positions, e.g. a Linear head
    on flattened features: d_in² + d_out² instead of d_out·d_in² per sample). ``dim``: the
    store's dimension (default: the layout's end);
    coordinates outside every block need ``rest_diagonal`` (r,) from a
    :class:`DiagonalAccumulator` over the store's rows, in :func:`rest_index` order.

    ``comm`` (a process group, :mod:`engine.distributed`): each rank passes its own samples
    (``covariances``, ``captured``, ``rows()``, ``batches()``); the covariances and Λ's sums are
    summed over the ranks, every rank takes rank 0's eigenbases, and every rank returns the
    factors of all the samples."""
    layout = tuple(layout)
    dim = max((int(blk.index().max()) + 1 for blk in layout), default=0) if dim is None else dim
    rest = rest_index(layout, dim)
    if rest_diagonal is None and len(rest):
        raise ValueError(f"{len(rest)} store coordinates lie outside every layer block: "
                         "pass their rest_diagonal")
    if covariances is None and batches is None:
        raise ValueError("fit_ekfac needs batches() or accumulated covariances")
    if rows is None and batches is None:
        raise ValueError("fit_ekfac needs batches() or the store's rows() for Λ")
    cov = covariances
    if cov is None:
        cov = CovarianceAccumulator(layout, dtype=dtype, device=device)
        for name, a, delta in batches():  # type: ignore[misc]
            cov.update(name, a, delta)
    if comm is not None:
        cov.all_reduce(comm)
    bases, spectra = {}, {}
    for blk in layout:
        a_cov, s_cov = cov.covariances(blk.name)
        if comm is None or comm.is_root:
            (sig_a, q_a), (sig_s, q_s) = eigenbasis(a_cov), eigenbasis(s_cov)
        else:  # rank 0's bases, broadcast below: one basis for all
            sig_a, sig_s = a_cov.new_zeros(blk.d_in), s_cov.new_zeros(blk.d_out)
            q_a, q_s = torch.zeros_like(a_cov), torch.zeros_like(s_cov)
        if comm is not None:
            sig_a, q_a, sig_s, q_s = (comm.broadcast(t.contiguous()) for t in (sig_a, q_a, sig_s, q_s))
        bases[blk.name], spectra[blk.name] = (q_a, q_s), (sig_a, sig_s)
    lam = LambdaAccumulator(bases, dtype=dtype, device=device)
    captured = captured or {}
    for name, pairs in captured.items():
        for a, delta in pairs:
            lam.update(name, a, delta)
    from_rows = [blk for blk in layout if blk.name not in captured]
    if rows is not None and from_rows:
        index = {blk.name: blk.index() for blk in from_rows}
        for block in rows():  # (b, dim)
            for blk in from_rows:
                cols = block[:, index[blk.name].to(block.device)]  # (b, d_out·d_in)
                lam.update_gradients(blk.name, cols.reshape(-1, blk.d_out, blk.d_in))
    elif rows is None:
        for name, a, delta in batches():  # type: ignore[misc]
            if name not in captured:
                lam.update(name, a, delta)
    if comm is not None:
        lam.all_reduce(comm)
    layers = {blk.name: LayerFactors(
        activation_eigenvectors=bases[blk.name][0], gradient_eigenvectors=bases[blk.name][1],
        activation_eigenvalues=spectra[blk.name][0], gradient_eigenvalues=spectra[blk.name][1],
        lambda_matrix=lam.lambda_matrix(blk.name), num_positions=cov.positions[blk.name],
        num_samples=lam.samples[blk.name]) for blk in layout}
    diag = torch.zeros(0, dtype=torch.float64) if rest_diagonal is None else rest_diagonal.double()
    return EKFACFactors(layout=layout, layers=layers, dim=dim, rest=rest, rest_diagonal=diag.cpu())


_TENSOR_FIELDS = ("activation_eigenvectors", "gradient_eigenvectors", "activation_eigenvalues",
                  "gradient_eigenvalues", "lambda_matrix")
_COUNT_FIELDS = ("num_positions", "num_samples", "offset", "bias_offset")


def factors_to_tensors(factors: EKFACFactors) -> dict[str, torch.Tensor]:
    """The factors as a flat dict of CPU tensors (safetensors- and ``torch.save``-ready):
    ``layers/<name>/<field>`` per layer (the fields of :class:`LayerFactors`, its ``offset`` and
    ``bias_offset`` (−1: none), counts as int64 scalars), ``dim``, ``rest/index`` and ``rest/diagonal``."""
    out: dict[str, torch.Tensor] = {"dim": torch.tensor(factors.dim, dtype=torch.int64),
                                    "rest/index": factors.rest.to(torch.int64).cpu(),
                                    "rest/diagonal": factors.rest_diagonal.cpu()}
    for blk in factors.layout:
        f = factors.layers[blk.name]
        for key in _TENSOR_FIELDS:
            out[f"layers/{blk.name}/{key}"] = getattr(f, key).cpu().contiguous()
        counts = {"num_positions": f.num_positions, "num_samples": f.num_samples, "offset": blk.offset,
                  "bias_offset": -1 if blk.bias_offset is None else blk.bias_offset}
        for key, value in counts.items():
            out[f"layers/{blk.name}/{key}"] = torch.tensor(value, dtype=torch.int64)
    return out


def factors_from_tensors(tensors: Mapping[str, torch.Tensor]) -> EKFACFactors:
    """The inverse of :func:`factors_to_tensors` (layers ordered by offset)."""
    fields: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("layers/"):
            name, field = key[len("layers/"):].rsplit("/", 1)
            fields.setdefault(name, {})[field] = value
    layout, layers = [], {}
    for name, f in sorted(fields.items(), key=lambda item: int(item[1]["offset"])):
        if set(f) != set(_TENSOR_FIELDS) | set(_COUNT_FIELDS):
            raise ValueError(f"EK-FAC factors of layer {name!r} are incomplete: {sorted(f)}")
        lam = f["lambda_matrix"]
        bias = int(f["bias_offset"])
        layout.append(LayerBlock(name, lam.shape[0], lam.shape[1], int(f["offset"]),
                                 None if bias < 0 else bias))
        layers[name] = LayerFactors(**{k: f[k] for k in _TENSOR_FIELDS},
                                    num_positions=int(f["num_positions"]),
                                    num_samples=int(f["num_samples"]))
    return EKFACFactors(layout=tuple(layout), layers=layers, dim=int(tensors["dim"]),
                        rest=tensors["rest/index"], rest_diagonal=tensors["rest/diagonal"])
