"""Models: the built-in zoo, user models, losses, the flat-θ objective and training."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import BuildConfig, ModelKind
from ..errors import ModelError
from .losses import make_loss
from .objective import Objective
from .user import is_factory_spec, load_factory, load_torchscript
from .zoo import build_model

BUFFER_PREFIX = "buffer/"  # model.pt keys of the module's buffers (BatchNorm running statistics)

__all__ = [
    "BUFFER_PREFIX",
    "build_dtype",
    "load_buffers",
    "make_module",
    "make_objective",
    "model_buffers",
    "model_fingerprint",
    "model_kind",
    "resolve_device",
    "resolve_dtype",
]


def model_kind(spec: str) -> ModelKind:
    """``logreg|svm|mlp|cnn`` → that kind; a file path or ``module:factory`` → USER."""
    try:
        kind = ModelKind(spec)
    except ValueError:
        if spec.endswith((".pt", ".pth", ".ts", ".jit")) or is_factory_spec(spec) or Path(spec).is_file():
            return ModelKind.USER
        raise ModelError(
            f"unknown model {spec!r}: use logreg, svm, mlp, cnn, resnet, a TorchScript file, "
            "or package.module:factory with --weights"
        ) from None
    if kind is ModelKind.USER:
        raise ModelError("name a user model by its TorchScript file or module:factory")
    return kind


def make_module(config: BuildConfig, *, input_shape: tuple[int, ...], n_classes: int,
                script_path: Path | None = None) -> nn.Module:
    """The (untrained, or user-trained) module named by ``config.model``."""
    kind = model_kind(config.model)
    if kind is not ModelKind.USER:
        return build_model(kind, input_shape=input_shape, n_classes=n_classes,
                           train=config.train, seed=config.seed)
    if is_factory_spec(config.model):
        weights = Path(config.weights) if config.weights else None
        return load_factory(config.model, weights=weights, input_shape=input_shape, n_classes=n_classes)
    return load_torchscript(script_path or Path(config.model))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ModelError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float64 if device.type == "cpu" else torch.float32
    table = {"float64": torch.float64, "float32": torch.float32}
    if name not in table:
        raise ModelError(f"unknown dtype {name!r}: use auto, float64 or float32")
    return table[name]


def build_dtype(config: BuildConfig, device: torch.device) -> torch.dtype:
    """``auto``: convex models in float64 (θ̂ to ‖∇R‖ < 1e-8, exact scores), networks in float32
    (per-sample gradients about 10× faster than float64 on a CPU); else ``config.dtype``."""
    if config.dtype == "auto":
        return torch.float64 if model_kind(config.model).convex else torch.float32
    return resolve_dtype(config.dtype, device)


def make_objective(module: nn.Module, config: BuildConfig, *, device: torch.device,
                   dtype: torch.dtype, tracked: Sequence[str] | None = None) -> Objective:
    """The module as a function of θ: every trainable parameter, or the ``tracked`` ones."""
    kind = model_kind(config.model)
    if device.type == "cuda" and dtype == torch.float32:
        # cuDNN runs float32 convolutions in TF32 (10-bit mantissa) unless told not to: per-sample
        # gradients and Hessian-vector products of a CNN would lose ~3 digits, and the HVP its
        # symmetry. (matmul TF32 is off by default; a user who turns it on keeps it.) The legacy
        # flag is set, not cudnn.conv.fp32_precision: mixing the two APIs makes torch raise.
        torch.backends.cudnn.allow_tf32 = False
    return Objective(module, make_loss(kind.value, svm_temperature=config.svm_temperature),
                     device=device, dtype=dtype, tracked=tracked)


def model_fingerprint(objective: Objective, theta: torch.Tensor) -> str:
    """sha256 over parameter names, shapes and θ̂ as float64 bytes, and over the names and values
    of the parameters θ leaves fixed (``--params``; none by default, so the digest is unchanged)."""
    h = hashlib.sha256()
    for name, shape in zip(objective.names, objective.shapes):
        h.update(f"{name}:{shape};".encode())
    h.update(theta.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    for name, p in objective.frozen:
        h.update(f"frozen {name}:{tuple(p.shape)};".encode())
        h.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    for name, b in objective.model.named_buffers():  # BatchNorm statistics (none in most models)
        h.update(f"buffer {name}:{tuple(b.shape)};".encode())
        h.update(b.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def model_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's buffers (BatchNorm's running statistics: part of the model at θ̂, not of θ),
    keyed for ``model.pt``."""
    return {BUFFER_PREFIX + n: b.detach().cpu().clone() for n, b in module.named_buffers()}


def load_buffers(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Write the buffers saved by :func:`model_buffers` back into ``module`` (others untouched)."""
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        for key, value in saved.items():
            if key.startswith(BUFFER_PREFIX) and key[len(BUFFER_PREFIX):] in buffers:
                target = buffers[key[len(BUFFER_PREFIX):]]
                target.copy_(value.to(device=target.device, dtype=target.dtype))
