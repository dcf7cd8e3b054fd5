"""A ResNet-18-style network for small images (He et al. 2016, the CIFAR variant).

A 3×3 stem, four stages of two basic blocks each (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2),
BatchNorm after every convolution, global average pooling and one linear layer. ``width`` 64 is
ResNet-18 itself (11.2M parameters on 3-channel inputs); the built-in default is narrower so that
it trains on a CPU. Influence is computed in eval mode: BatchNorm uses its running statistics,
so every sample's output depends on that sample alone.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ChannelsFirst

__all__ = ["BasicBlock", "ResNet", "resnet"]

STAGES = (1, 2, 4, 8)  # widths relative to ``width``
BLOCKS = (2, 2, 2, 2)  # basic blocks per stage: ResNet-18


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``; the shortcut is a strided 1×1
    convolution with BatchNorm when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Inputs (b, H, W) or (b, H, W, C) channels last, as the engine's data sets hold images."""

    def __init__(self, *, in_channels: int, n_classes: int, width: int = 16) -> None:
        super().__init__()
        self.to_channels_first = ChannelsFirst()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        c_in = width
        for i, (mult, blocks) in enumerate(zip(STAGES, BLOCKS)):
            c_out = width * mult
            for b in range(blocks):
                layers.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and b == 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(self.to_channels_first(x))))  # (b, w, H, W)
        out = self.pool(self.layers(out)).flatten(1)  # (b, 8w)
        return self.fc(out)  # (b, C)


def resnet(input_shape: tuple[int, ...], n_classes: int, *, width: int) -> ResNet:
    """The built-in ``resnet`` for images of shape (H, W) or (H, W, C)."""
    from ..errors import ModelError

    if len(input_shape) not in (2, 3) or min(input_shape[:2]) < 4:
        raise ModelError(f"the resnet model needs images of shape (H, W) or (H, W, C) of at least "
                         f"4×4; this data has samples of shape {input_shape}")
    if width < 1:
        raise ModelError(f"resnet width must be at least 1, got {width}")
    channels = 1 if len(input_shape) == 2 else input_shape[2]
    return ResNet(in_channels=channels, n_classes=n_classes, width=width)
