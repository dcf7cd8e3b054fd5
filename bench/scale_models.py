"""A user's ResNet-18 for the scale benchmark, loaded as ``--model bench.scale_models:resnet18``.

The factory is what a user would write: a CIFAR-style ResNet-18 (3×3 stem, four stages of two
basic blocks, BatchNorm after every convolution; 11.2M parameters at width 64 on RGB). It takes
images in the engine's channels-last layout (b, H, W, C). :func:`save_weights` writes the
state_dict the build loads with ``--weights``: randomly initialised, with BatchNorm running
statistics set from a few train-mode forward passes over the data (not their initial 0 / 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.models.resnet import ResNet

__all__ = ["resnet18", "save_weights"]


def resnet18(n_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-18 for small images; inputs (b, H, W, in_channels), logits (b, n_classes)."""
    return ResNet(in_channels=in_channels, n_classes=n_classes, width=width)


def save_weights(path: Path, *, x: np.ndarray, n_classes: int, width: int = 64, seed: int = 0,
                 batches: int = 4, batch: int = 64) -> Path:
    """Seeded initial weights of :func:`resnet18` with BatchNorm running statistics averaged
    over ``batches`` train-mode forward passes of x (n, H, W, C) (float in [0, 1] or uint8)."""
    torch.manual_seed(seed)
    model = resnet18(n_classes, x.shape[-1], width)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the passes
    model.train()
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    with torch.no_grad():
        for b in range(batches):
            xb = torch.from_numpy(np.asarray(x[b * batch : (b + 1) * batch], dtype=np.float32) / scale)
            model(xb)  # (batch, H, W, C) → logits; updates the running statistics
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1  # back to the default, which the state_dict does not hold anyway
    torch.save(model.state_dict(), path)
    return path
