"""User models: a TorchScript file, or ``package.module:factory`` plus a state_dict file.

A user model is taken as already trained: its parameters are θ̂. It receives batches in the data
set's own layout ``(b, *input_shape)`` and must return logits ``(b, C)``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError

__all__ = ["is_factory_spec", "load_factory", "load_torchscript"]

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory_spec(spec: str) -> bool:
    return bool(_FACTORY.match(spec))


def load_torchscript(path: Path) -> nn.Module:
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises several types for a bad archive
        raise ModelError(f"{path}: not a TorchScript model ({type(exc).__name__}: {exc})") from exc


def load_factory(spec: str, *, weights: Path | None, input_shape: tuple[int, ...],
                 n_classes: int) -> nn.Module:
    """Call ``module:factory`` (with ``input_shape``/``n_classes`` if it takes them), load weights."""
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from exc
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ModelError(f"{module_name!r} has no callable {func_name!r}")
    params = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in (("input_shape", input_shape), ("n_classes", n_classes)) if k in params}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is None:
        raise ModelError(f"model {spec!r} needs --weights STATE_DICT.pt (its trained parameters)")
    if not weights.is_file():
        raise ModelError(f"weights file {weights} does not exist")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        raise ModelError(f"{weights}: cannot load into {spec} ({type(exc).__name__}: {exc})") from exc
    return model
