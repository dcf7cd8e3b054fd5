"""Which modules' parameters are tracked (``--params``), and how each one's gradient is formed.

A *Kronecker layer* (``nn.Linear``, ``nn.Conv2d``) has a per-sample weight gradient that is a sum
of outer products ``G = Σ_s δ_s a_sᵀ`` over positions s (a convolution is a linear layer over
unfolded patches); with a bias, ``a`` gets a ones column and G's last column is the bias gradient.
A grouped convolution is g such blocks, ``G_j (d_out/g, d_in/g·kh·kw [+1])``. An *exact module*
(BatchNorm/LayerNorm/GroupNorm/RMSNorm affine) has a small per-sample gradient computed whole from
its normalised input and output gradient. Any other module with trainable parameters of its own is
refused with its name, so that ``--params`` can leave it out.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum

import torch
from torch import nn

from ..errors import ModelError

__all__ = ["LayerKind", "Selection", "TrackedLayer", "parse_patterns", "select_modules"]

KRONECKER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
EXACT_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
)


class LayerKind(str, Enum):
    KRONECKER = "kronecker"
    EXACT = "exact"


@dataclass(frozen=True)
class TrackedLayer:
    """One tracked module.

    ``param_names`` are full names in ``named_parameters()`` order and ``offset`` the start of
    this module's parameters in the tracked flat vector (they are contiguous there). For a
    Kronecker layer ``d_in``/``d_out`` are per group, without the bias column: G_j is
    (d_out, d_in + bias) for each of ``groups`` groups (``conv``: a Conv2d); for an exact
    module they are 0.
    """

    name: str
    kind: LayerKind
    module_type: str
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    offset: int
    numel: int
    d_in: int = 0
    d_out: int = 0
    groups: int = 1
    bias: bool = False
    conv: bool = False

    @property
    def in_rows(self) -> int:
        """Rows of the layer's input projection: the block-diagonal G's width g·(d_in + bias)."""
        return self.groups * (self.d_in + int(self.bias))

    @property
    def out_rows(self) -> int:
        """Rows of the layer's output projection: g·d_out."""
        return self.groups * self.d_out

    @property
    def local_names(self) -> tuple[str, ...]:
        """Parameter names inside the module ('weight', 'bias')."""
        return tuple(n.rsplit(".", 1)[-1] for n in self.param_names)

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["kind"] = self.kind.value
        out["param_shapes"] = [list(s) for s in self.param_shapes]
        out["param_names"] = list(self.param_names)
        return out


@dataclass(frozen=True)
class Selection:
    """The tracked modules of a model, in ``named_modules()`` order."""

    patterns: tuple[str, ...] | None
    layers: tuple[TrackedLayer, ...]

    @property
    def n_params(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Tracked parameters in ``named_parameters()`` order (the tracked flat vector's order)."""
        return tuple(n for layer in self.layers for n in layer.param_names)

    @property
    def kronecker(self) -> tuple[TrackedLayer, ...]:
        return tuple(layer for layer in self.layers if layer.kind is LayerKind.KRONECKER)

    @property
    def exact(self) -> tuple[TrackedLayer, ...]:
        return tuple(layer for layer in self.layers if layer.kind is LayerKind.EXACT)

    def flat_index(self, model: nn.Module) -> torch.Tensor:
        """Positions (p_tracked,) int64 of the tracked entries in the full flat θ, which lists
        every trainable parameter of ``model`` in ``named_parameters()`` order."""
        starts: dict[str, tuple[int, int]] = {}
        pos = 0
        for name, p in model.named_parameters():
            if p.requires_grad:
                starts[name] = (pos, p.numel())
                pos += p.numel()
        parts = [torch.arange(starts[n][0], starts[n][0] + starts[n][1]) for n in self.param_names]
        return torch.cat(parts)

    def to_dict(self) -> dict[str, object]:
        """JSON-able description (what a run records about what it tracks)."""
        return {
            "patterns": None if self.patterns is None else list(self.patterns),
            "n_params": self.n_params,
            "layers": [layer.to_dict() for layer in self.layers],
        }


def parse_patterns(patterns: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """'fc, layer4.*' or ['fc', 'layer4.*'] → ('fc', 'layer4.*'); None or empty → None."""
    if patterns is None:
        return None
    items = patterns.split(",") if isinstance(patterns, str) else list(patterns)
    cleaned = tuple(p.strip() for p in items if p.strip())
    return cleaned or None


def _matches(name: str, patterns: tuple[str, ...] | None) -> bool:
    """A module matches when its name, or the name of a module containing it, matches."""
    if patterns is None:
        return True
    parts = name.split(".") if name else []
    prefixes = [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(pre, pat) for pre in prefixes for pat in patterns)


def _own_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def _kronecker_dims(name: str, module: nn.Module, local: list[str]) -> dict[str, int | bool]:
    if "weight" not in local:
        raise ModelError(
            f"module {name!r} ({type(module).__name__}) has a trainable bias but a frozen weight; "
            f"the layer-wise path tracks whole layers: freeze both or leave it out with --params"
        )
    w = module.weight
    if isinstance(module, nn.Linear):
        return {"d_in": w.shape[1], "d_out": w.shape[0], "groups": 1, "bias": "bias" in local,
                "conv": False}
    conv: nn.Conv2d = module  # type: ignore[assignment]
    g = conv.groups
    return {"d_in": math.prod(w.shape[1:]), "d_out": w.shape[0] // g, "groups": g,
            "bias": "bias" in local, "conv": True}


def _check_exact(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
        raise ModelError(
            f"module {name!r} ({type(module).__name__}) keeps no running statistics, so in eval "
            f"mode it normalises with the batch's own statistics and one sample's gradient "
            f"depends on the others; leave it out with --params"
        )


def select_modules(model: nn.Module, patterns: str | Sequence[str] | None = None) -> Selection:
    """The tracked modules: every module with trainable parameters of its own whose name (or an
    enclosing module's name) in ``named_modules()`` matches one of the ``fnmatch`` patterns
    (comma-separated string or list; None: every such module; the root module is named '').

    Raises ModelError for a matched module of a type the layer-wise path cannot differentiate
    per sample, for parameters shared between modules, and when nothing is matched.
    """
    pats = parse_patterns(patterns)
    order: dict[int, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            order.setdefault(id(p), len(order))
    owners: dict[int, str] = {}
    picked: list[tuple[int, str, nn.Module, list[tuple[str, nn.Parameter]]]] = []
    for name, module in model.named_modules():
        own = _own_params(module)
        for _, p in own:
            if id(p) in owners:
                raise ModelError(
                    f"parameter shared by modules {owners[id(p)]!r} and {name!r}: the layer-wise "
                    f"path needs each tracked parameter to belong to one module"
                )
            owners[id(p)] = name
        if own and _matches(name, pats):
            picked.append((order[id(own[0][1])], name, module, own))
    if not picked:
        names = [n for n, m in model.named_modules() if _own_params(m)]
        raise ModelError(
            f"--params {','.join(pats or ())!r} matches no module with trainable parameters; "
            f"modules with parameters: {', '.join(names[:20])}{' …' if len(names) > 20 else ''}"
        )
    layers: list[TrackedLayer] = []
    offset = 0
    for _, name, module, own in sorted(picked, key=lambda t: t[0]):
        own = sorted(own, key=lambda np_: order[id(np_[1])])
        local = [n for n, _ in own]
        full = tuple(f"{name}.{n}" if name else n for n in local)
        shapes = tuple(tuple(p.shape) for _, p in own)
        numel = sum(p.numel() for _, p in own)
        if isinstance(module, KRONECKER_TYPES):
            dims = _kronecker_dims(name, module, local)
            layer = TrackedLayer(name, LayerKind.KRONECKER, type(module).__name__, full, shapes,
                                 offset, numel, **dims)  # type: ignore[arg-type]
        elif isinstance(module, EXACT_TYPES):
            _check_exact(name, module)
            layer = TrackedLayer(name, LayerKind.EXACT, type(module).__name__, full, shapes,
                                 offset, numel)
        else:
            raise ModelError(
                f"module {name!r} of type {type(module).__name__} has trainable parameters "
                f"({', '.join(local)}) but the layer-wise path handles only Linear and Conv2d "
                f"(and BatchNorm/LayerNorm/GroupNorm/RMSNorm affine); leave it out with --params"
            )
        layers.append(layer)
        offset += numel
    return Selection(pats, tuple(layers))
