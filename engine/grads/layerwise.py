"""Layer-wise per-sample gradients of the tracked modules, exact or Kronecker-projected.

The parts: :func:`select_modules` (which modules, ``--params``), :func:`capture` (hooks keep each
tracked layer's inputs and output gradients for a batch), :class:`KroneckerProjector`
(``vec(P_outᵀ G P_in)`` per layer without forming G), and here the reference
:func:`layer_gradients` (the materialised per-sample gradient, which equals ``vmap(grad)``'s
restricted to the tracked parameters) and the chunked driver :func:`layerwise_grads`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..models.losses import LossFn
from .capture import Captures, LayerCapture, capture, model_dtype
from .chunks import Sink, stream_rows
from .kronecker import KroneckerProjector
from .layers import LayerKind, Selection, TrackedLayer, select_modules

__all__ = [
    "Captures", "KroneckerProjector", "LayerCapture", "LayerKind", "Selection", "TrackedLayer",
    "capture", "gradient_energy", "layer_gradients", "layer_matrices", "layerwise_grads",
    "select_modules",
]


def layer_matrices(captures: Captures) -> dict[str, torch.Tensor]:
    """Per Kronecker layer the materialised per-sample gradient blocks (b, g, d_out, d_in [+1]):
    ``G_ij = Σ_s δ_isj a_isjᵀ`` from raw captures (reference; memory b·p)."""
    if captures.projected:
        raise ValueError("layer_matrices needs raw captures (capture(...) without a projector)")
    return {name: torch.einsum("bsgo,bsgi->bgoi", lc.delta, lc.a)  # (b, g, d_out, d_in [+1])
            for name, lc in captures.kron.items()}


def _flat_layer(layer: TrackedLayer, blocks: torch.Tensor) -> torch.Tensor:
    """(b, g, d_out, d_in [+1]) → the layer's parameters flattened in their order (b, p_layer):
    weight as ``weight.view(C_out, -1)`` (groups stacked on the output axis), then bias."""
    b = blocks.shape[0]
    if not layer.bias:
        return blocks.reshape(b, -1)  # (b, g·d_out·d_in), a view
    parts = {"weight": blocks[..., : layer.d_in].reshape(b, -1)}  # (b, g·d_out·d_in)
    parts["bias"] = blocks[..., -1].reshape(b, -1)  # (b, g·d_out)
    return torch.cat([parts[n] for n in layer.local_names], 1)


def layer_gradients(captures: Captures, *, selection: Selection) -> torch.Tensor:
    """Per-sample gradients (b, p_tracked) of the tracked parameters, in ``named_parameters()``
    order, materialised from raw captures: ``G_i = Σ_s δ_s a_sᵀ`` per Kronecker layer (with the
    bias column), the exact modules' gradients as captured. Each block is written into its
    columns of one (b, p_tracked) tensor (no per-layer concatenation)."""
    if captures.projected:
        raise ValueError("layer_gradients needs raw captures (capture(...) without a projector)")
    b = captures.batch
    out = None
    for layer in selection.layers:
        cols = slice(layer.offset, layer.offset + layer.numel)
        if layer.kind is not LayerKind.KRONECKER:
            block = captures.exact[layer.name]  # (b, numel)
        else:
            lc = captures.kron[layer.name]
            block = _flat_layer(layer, torch.einsum("bsgo,bsgi->bgoi", lc.delta, lc.a))  # (b, numel)
        if out is None:
            out = torch.empty(b, selection.n_params, dtype=block.dtype, device=block.device)
        out[:, cols] = block
    assert out is not None
    return out  # (b, p_tracked)


def layerwise_grads(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    selection: Selection,
    projector: KroneckerProjector | None = None,
    chunk: int = 64,
    sink: Sink | None = None,
    progress: Callable[[int], None] | None = None,
    on_captures: Callable[[slice, Captures], None] | None = None,
) -> torch.Tensor | None:
    """Per-sample gradients of the tracked parameters for x (n, ...), y (n,), in chunks.

    With a projector: rows ``[vec(P_outᵀ G_i P_in) per layer, exact block]`` (n, projector.k),
    from projected captures (no per-sample gradient or unfolded input is formed); without one:
    the exact per-layer gradients (n, p_tracked). dtype and device: the model's (eval mode, its
    current parameters; hooks live only during the call, so no other thread may run ``model``
    meanwhile). ``sink(rows, block)`` receives each chunk instead of returning the whole;
    ``on_captures(rows, captures)`` sees each chunk's captures (projected (ã, δ̃) with a
    projector) e.g. to accumulate Kronecker factors; ``progress(n_done_in_chunk)``.
    """

    def one(rows: slice) -> torch.Tensor:
        caps = capture(model, loss_fn, x[rows], y[rows], selection=selection, projector=projector)
        if on_captures is not None:
            on_captures(rows, caps)
        if projector is not None:
            return projector.project(caps)  # (b, K)
        return layer_gradients(caps, selection=selection)  # (b, p_tracked)

    width = projector.k if projector is not None else selection.n_params
    return stream_rows(len(x), chunk, one, sink=sink, progress=progress,
                       empty=lambda: torch.empty(0, width, dtype=model_dtype(model)))


def gradient_energy(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *,
                    selection: Selection, chunk: int = 16) -> dict[str, float]:
    """Mean over the n samples of ``‖∇_θl L(z_i, θ)‖²`` per tracked module l (by name): the
    weights for :class:`KroneckerProjector`'s split. Meant for a small calibration batch: each
    chunk's raw captures are unfolded and each layer's per-sample gradient formed in turn."""
    total = dict.fromkeys((layer.name for layer in selection.layers), 0.0)
    for start in range(0, len(x), chunk):
        rows = slice(start, min(start + chunk, len(x)))
        caps = capture(model, loss_fn, x[rows], y[rows], selection=selection)
        for name, g in caps.exact.items():
            total[name] += float(g.pow(2).sum())
        for name in list(caps.kron):
            lc = caps.kron.pop(name)
            blocks = torch.einsum("bsgo,bsgi->bgoi", lc.delta, lc.a)  # (b, g, d_out, d_in [+1])
            total[name] += float(blocks.pow(2).sum())
    return {name: value / max(1, len(x)) for name, value in total.items()}
