"""Per-sample data losses ``L(z, θ)`` as functions of logits; both return the batch mean."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["LossFn", "cross_entropy", "make_loss", "smooth_hinge"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy. logits (b, C), y (b,) int64 → scalar."""
    return F.cross_entropy(logits, y)


def smooth_hinge(logits: torch.Tensor, y: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """One-vs-rest smooth hinge (Koh & Liang 2017, §4.1), mean over the batch.

    For each class c the margin is ``s_c = ±f_c(x)`` (+ for the true class), and
    ``SmoothHinge(s, t) = t·log(1 + exp((1 − s)/t))``, which tends to ``max(0, 1 − s)`` as t → 0.
    logits (b, C), y (b,) → scalar (sum over classes, mean over the batch).
    """
    sign = torch.full_like(logits, -1.0)  # (b, C)
    sign = sign.scatter(1, y.unsqueeze(1), 1.0)
    margins = sign * logits  # (b, C)
    return (temperature * F.softplus((1.0 - margins) / temperature)).sum(dim=1).mean()


def make_loss(kind: str, *, svm_temperature: float) -> LossFn:
    """The data loss for a model kind: smooth hinge for ``svm``, cross-entropy otherwise."""
    if kind == "svm":
        t = float(svm_temperature)
        return lambda logits, y: smooth_hinge(logits, y, temperature=t)
    return cross_entropy
