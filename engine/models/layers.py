"""Small layers the built-in models share."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelsFirst"]


class ChannelsFirst(nn.Module):
    """(b, H, W) → (b, 1, H, W); (b, H, W, C) → (b, C, H, W): the engine's image layout (channels
    last) to PyTorch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return x.unsqueeze(1)
        return x.permute(0, 3, 1, 2)
