"""Hooks that keep each tracked layer's inputs and output gradients for one batch.

One forward pass of the model in eval mode with forward hooks on the tracked modules, then one
backward pass of the *summed* per-sample data loss ``Σ_i L(z_i, θ)`` (so the output gradient of
sample i is that of its own loss) that stops at the tracked modules' outputs: the gradients are
asked for at the outputs' autograd edges taken in the forward hook, so no parameter gradient is
computed and an in-place op after a module (``ReLU(inplace=True)``, ``out += identity``) does not
change what is captured. Everything a forward hook needs from a module's input is computed in the
hook itself, so later in-place changes to the input do not matter either.

What is kept (b samples, s positions, g groups):

- Kronecker layer, raw: ``a`` (b, s, g, d_in [+1]) patches with a ones column for the bias, and
  ``δ`` (b, s, g, d_out); the per-sample gradient of group j is ``G_j = Σ_s δ_sj a_sjᵀ``.
- Kronecker layer, projected (a projector given): ``ã = P_inᵀ a`` (b, s·g, k_in) and
  ``δ̃ = P_outᵀ δ`` (b, s·g, k_out), groups folded into positions (each group has its own rows of
  P_in and P_out, so ``Σ_(s,j) δ̃ ãᵀ = P_outᵀ G P_in`` for the block-diagonal G).
- Exact module: its per-sample parameter gradients (b, p_module), e.g. for eval-mode BatchNorm
  ``dγ = Σ_s δ_s ⊙ x̂_s``, ``dβ = Σ_s δ_s`` with x̂ normalised by the running statistics (its
  input is kept by reference, refused if changed in place before the backward pass).

A module called several times in one forward contributes every call (positions concatenated,
exact gradients summed). The hooks live only for the call; the model is put in eval mode for it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.func import vmap

from ..errors import ModelError
from ..models.losses import LossFn
from .layers import LayerKind, Selection, TrackedLayer

__all__ = ["Captures", "LayerCapture", "capture", "conv_patches", "model_dtype", "padded_input"]

PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
                 "circular": "circular"}


class InputProjector(Protocol):
    """What :func:`capture` needs from a projector (``KroneckerProjector`` provides it)."""

    def project_input(self, layer: TrackedLayer, module: nn.Module, x: torch.Tensor
                      ) -> torch.Tensor: ...

    def project_output_grad(self, layer: TrackedLayer, delta: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LayerCapture:
    """A Kronecker layer's inputs and output gradients for a batch (shapes: module docstring)."""

    a: torch.Tensor
    delta: torch.Tensor


@dataclass
class Captures:
    """Per-layer captures of one batch: ``kron`` by layer name, ``exact`` per-sample gradients
    (b, p_module) by module name; ``projected`` says whether ``kron`` holds (ã, δ̃) or (a, δ)."""

    kron: dict[str, LayerCapture]
    exact: dict[str, torch.Tensor]
    projected: bool
    batch: int


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (that of its first floating parameter)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


# ------------------------------------------------------------------ convolution geometry
def _explicit_padding(conv: nn.Conv2d) -> list[int]:
    """F.pad order (w_left, w_right, h_left, h_right), 'same' padding extra on the right."""
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    if conv.padding == "same":
        pads: list[int] = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    ph, pw = conv.padding  # type: ignore[misc]
    return [pw, pw, ph, ph]


def padded_input(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(x with any padding the convolution cannot take as a symmetric zero padding applied,
    the symmetric zero padding (ph, pw) left to the unfold/convolution)."""
    if conv.padding_mode not in PADDING_MODES:
        raise ModelError(f"Conv2d padding_mode {conv.padding_mode!r} is not supported")
    pads = _explicit_padding(conv)
    if conv.padding_mode == "zeros" and pads[0] == pads[1] and pads[2] == pads[3]:
        return x, (pads[2], pads[0])
    return F.pad(x, pads, mode=PADDING_MODES[conv.padding_mode]), (0, 0)


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded patches (b, L, g, C_in/g·kh·kw) of x (b, C_in, H, W), L output positions; the
    last axis is ordered (channel, kh, kw) like ``weight.view(C_out, -1)``."""
    xp, padding = padded_input(conv, x)
    cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, padding=padding,
                    stride=conv.stride)  # (b, C_in·kh·kw, L)
    b, _, length = cols.shape
    return cols.view(b, conv.groups, -1, length).permute(0, 3, 1, 2)  # (b, L, g, d_in)


def _raw_input(layer: TrackedLayer, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """a (b, s, g, d_in [+1]) of a Kronecker layer's input x."""
    if isinstance(module, nn.Conv2d):
        a = conv_patches(module, x)  # (b, L, g, d_in)
    else:
        a = x.reshape(x.shape[0], -1, 1, x.shape[-1])  # (b, s, 1, d_in)
    if layer.bias:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)  # (b, s, g, d_in + 1)
    return a


def _raw_output_grad(layer: TrackedLayer, delta: torch.Tensor) -> torch.Tensor:
    """δ (b, s, g, d_out) of a Kronecker layer's output gradient."""
    b = delta.shape[0]
    if layer.conv:  # (b, C_out, H', W')
        return delta.reshape(b, layer.groups, layer.d_out, -1).permute(0, 3, 1, 2)
    return delta.reshape(b, -1, 1, delta.shape[-1])  # (b, s, 1, d_out)


# ------------------------------------------------------------------ exact modules
def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̂ of a LayerNorm/GroupNorm/RMSNorm: its output before the affine transform (x's shape).
    (A BatchNorm keeps x itself: its x̂ is affine in x per channel, see :func:`_exact_grads`.)"""
    if _is_batchnorm(module):
        return x
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    return F.rms_norm(x, module.normalized_shape, None, module.eps)  # nn.RMSNorm


def _exact_grads(layer: TrackedLayer, module: nn.Module, kept: torch.Tensor, delta: torch.Tensor
                 ) -> torch.Tensor:
    """Per-sample gradients (b, p_module) of an affine normalisation's tracked parameters:
    ``dγ = Σ_s δ_s ⊙ x̂_s``, ``dβ = Σ_s δ_s`` over the axes γ is broadcast along. For an eval-mode
    BatchNorm ``kept`` is its input x and ``Σ_s δ x̂ = (Σ_s δ x − μ Σ_s δ)/√(σ² + ε)`` with the
    running μ, σ² (no second normalisation pass); otherwise ``kept`` is x̂."""
    b = delta.shape[0]
    if _is_batchnorm(module) or isinstance(module, nn.GroupNorm):  # channels on axis 1
        c = delta.shape[1]
        d, k = delta.reshape(b, c, -1), kept.reshape(b, c, -1)  # (b, C, s)
        dbeta = d.sum(-1)  # (b, C)
        dgamma = torch.linalg.vecdot(d, k)  # (b, C)
        if _is_batchnorm(module):
            scale = torch.rsqrt(module.running_var + module.eps)  # (C,)
            dgamma = (dgamma - module.running_mean * dbeta) * scale
    else:  # LayerNorm / RMSNorm: parameters over the trailing normalized_shape
        m = math.prod(module.normalized_shape)
        d, k = delta.reshape(b, -1, m), kept.reshape(b, -1, m)  # (b, s, m)
        dgamma, dbeta = (d * k).sum(1), d.sum(1)  # (b, m)
    parts = {"weight": dgamma, "bias": dbeta}
    return torch.cat([parts[n] for n in layer.local_names], dim=1)  # (b, p_m)


# ------------------------------------------------------------------ the capture pass
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, each module's mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def summed_loss(loss_fn: LossFn, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_i L(z_i, θ) over the batch, each term the loss of one sample alone."""
    return vmap(lambda li, yi: loss_fn(li.unsqueeze(0), yi.unsqueeze(0)))(logits, y).sum()


@dataclass
class _Call:
    layer: TrackedLayer
    module: nn.Module
    kept: torch.Tensor  # a, ã, x̂, or a BatchNorm's input x itself
    edge: object  # the output's GradientEdge
    out_shape: torch.Size
    version: int  # of ``kept`` when taken (a BatchNorm's input must not change before backward)


def _forward_hooks(model: nn.Module, selection: Selection, projector: InputProjector | None,
                   calls: list[_Call]) -> list[torch.utils.hooks.RemovableHandle]:
    modules = dict(model.named_modules())
    handles = []
    for layer in selection.layers:
        module = modules[layer.name]

        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor,
                 layer: TrackedLayer = layer) -> None:
            x = inputs[0].detach()
            with torch.no_grad():
                if layer.kind is LayerKind.EXACT:
                    kept = _normalised(mod, x)
                elif projector is not None:
                    kept = projector.project_input(layer, mod, x)  # (b, s·g, k_in)
                else:
                    kept = _raw_input(layer, mod, x)  # (b, s, g, d_in [+1])
            calls.append(_Call(layer, mod, kept, get_gradient_edge(out), out.shape, kept._version))

        handles.append(module.register_forward_hook(hook))
    return handles


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """The calls of a module joined along positions (no copy for a single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def capture(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *,
            selection: Selection, projector: InputProjector | None = None) -> Captures:
    """Inputs and output gradients of the tracked layers for the batch x (b, ...), y (b,).

    x is cast to the model's dtype and device; with a projector the Kronecker layers' captures
    are projected as they are taken (never unfolded), else they are raw (see module docstring).
    """
    params = list(model.parameters())
    device = params[0].device if params else x.device
    x = x.to(device=device, dtype=model_dtype(model)) if x.is_floating_point() else x.to(device)
    y = y.to(device)
    calls: list[_Call] = []
    with eval_mode(model), torch.enable_grad():
        handles = _forward_hooks(model, selection, projector, calls)
        try:
            logits = model(x)
        finally:
            for h in handles:
                h.remove()
        loss = summed_loss(loss_fn, logits, y)
        grads = list(torch.autograd.grad(loss, [c.edge for c in calls], allow_unused=True))
    del logits, loss
    b = len(x)
    kron_a: dict[str, list[torch.Tensor]] = {}
    kron_d: dict[str, list[torch.Tensor]] = {}
    exact: dict[str, torch.Tensor] = {}
    for i, call in enumerate(calls):
        delta = grads[i]
        grads[i] = None  # type: ignore[call-overload]  # free as we go
        layer = call.layer
        if delta is None:  # the output does not reach the loss
            delta = torch.zeros(call.out_shape, dtype=call.kept.dtype, device=call.kept.device)
        if layer.kind is LayerKind.EXACT:
            if call.kept._version != call.version:
                raise ModelError(f"the input of {layer.name!r} is modified in place after the "
                                 f"module reads it; the layer-wise path cannot track it")
            g = _exact_grads(layer, call.module, call.kept, delta)
            exact[layer.name] = exact[layer.name] + g if layer.name in exact else g
            continue
        if projector is not None:
            d = projector.project_output_grad(layer, delta)  # (b, s·g, k_out)
        else:
            d = _raw_output_grad(layer, delta)  # (b, s, g, d_out)
        kron_a.setdefault(layer.name, []).append(call.kept)
        kron_d.setdefault(layer.name, []).append(d)
    kron = {n: LayerCapture(_join(kron_a[n]), _join(kron_d[n])) for n in kron_a}
    for layer in selection.layers:  # a tracked module the forward never called
        if layer.name not in kron and layer.name not in exact:
            raise ModelError(f"tracked module {layer.name!r} was not called by the model's forward")
    return Captures(kron, exact, projector is not None, b)
