"""Built-in models. Every model maps a batch in the data set's layout ``(b, *input_shape)`` to
logits ``(b, C)``; image layouts are ``(H, W)`` or ``(H, W, C)`` (channels last)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelKind, TrainConfig
from ..errors import ModelError
from .layers import ChannelsFirst
from .resnet import resnet

__all__ = ["ChannelsFirst", "build_model"]


def _cnn(input_shape: tuple[int, ...], n_classes: int, channels: tuple[int, ...]) -> nn.Module:
    if len(input_shape) not in (2, 3):
        raise ModelError(
            f"the cnn model needs image data of shape (H, W) or (H, W, C); this data has "
            f"samples of shape {input_shape}"
        )
    h, w = input_shape[0], input_shape[1]
    c_in = 1 if len(input_shape) == 2 else input_shape[2]
    layers: list[nn.Module] = [ChannelsFirst()]
    for c_out in channels:
        # smooth activation and average pooling keep the Hessian informative
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.Tanh()]
        if h >= 2 and w >= 2:
            layers.append(nn.AvgPool2d(2))
            h, w = h // 2, w // 2
        c_in = c_out
    layers += [nn.Flatten(), nn.Linear(c_in * h * w, n_classes)]
    return nn.Sequential(*layers)


def build_model(
    kind: ModelKind, *, input_shape: tuple[int, ...], n_classes: int, train: TrainConfig, seed: int
) -> nn.Module:
    """A freshly initialised built-in model (seeded). Convex models start at zero."""
    d = math.prod(input_shape)
    torch.manual_seed(seed)
    if kind in (ModelKind.LOGREG, ModelKind.SVM):
        model: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(d, n_classes))
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return model
    if kind is ModelKind.MLP:
        layers: list[nn.Module] = [nn.Flatten()]
        width = d
        for h in train.hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, n_classes))
        return nn.Sequential(*layers)
    if kind is ModelKind.CNN:
        return _cnn(input_shape, n_classes, train.channels)
    if kind is ModelKind.RESNET:
        return resnet(input_shape, n_classes, width=train.width)
    raise ModelError(f"unknown built-in model {kind!r}")
