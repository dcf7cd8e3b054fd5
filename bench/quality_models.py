"""Models shared by the curvature-quality benchmarks (kronecker_quality.py, kronfluence_compare.py).

Each factory returns the built-in ``cnn`` architecture (``engine.models.zoo``: channels-first,
3×3 convolutions with tanh and 2×2 average pooling, then one linear layer; an ``nn.Sequential``
root, which kronfluence also needs) at a fixed width, so that a benchmark can build it as a user
model (``quality_models:digits_cnn`` with ``weights=``) and hand the very same θ̂ to every
method. :func:`train_weights` trains it with the engine's own network trainer
(``engine.models.train.train_network``: minibatch Adam on ``R(θ) = mean CE + (λ/2)‖θ‖²``, then a
bounded L-BFGS polish) and writes its ``state_dict``.

Run the benchmarks from the repository root with ``bench/`` on the import path (``python
bench/<script>.py`` puts it there), so that ``quality_models:...`` imports.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from engine.config import ModelKind, TrainConfig
from engine.data import Dataset
from engine.models.losses import make_loss
from engine.models.objective import Objective
from engine.models.train import train_network
from engine.models.zoo import build_model

__all__ = ["DIGITS_CHANNELS", "DIGITS_SMALL_CHANNELS", "FMNIST_CHANNELS", "add_common_args", "digits_cnn",
           "digits_cnn_small", "fmnist_cnn", "load_average",
           "train_weights", "training_info", "weights_for"]

DIGITS_CHANNELS = (16, 48)  # 8×8×1 digits: 9,050 parameters (exact Hessian 655 MB in float64)
FMNIST_CHANNELS = (8, 16)  # 28×28×1 Fashion-MNIST: 9,098 parameters
DIGITS_SMALL_CHANNELS = (8, 16)  # 8×8×1 digits: 1,898 parameters (an exact Hessian in minutes on a CPU)


def _cnn(input_shape: tuple[int, ...], n_classes: int, channels: tuple[int, ...]) -> nn.Module:
    return build_model(ModelKind.CNN, input_shape=tuple(input_shape), n_classes=n_classes,
                       train=TrainConfig(channels=channels), seed=0)


def digits_cnn(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The built-in ``cnn`` with channels :data:`DIGITS_CHANNELS` (user-model factory)."""
    return _cnn(input_shape, n_classes, DIGITS_CHANNELS)


def digits_cnn_small(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The built-in ``cnn`` with channels :data:`DIGITS_SMALL_CHANNELS` (user-model factory)."""
    return _cnn(input_shape, n_classes, DIGITS_SMALL_CHANNELS)


def fmnist_cnn(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The built-in ``cnn`` with channels :data:`FMNIST_CHANNELS` (user-model factory)."""
    return _cnn(input_shape, n_classes, FMNIST_CHANNELS)


def train_weights(ds: Dataset, *, channels: tuple[int, ...], out: Path, weight_decay: float,
                  epochs: int, polish_s: float, seed: int = 0,
                  dtype: torch.dtype = torch.float64) -> dict[str, float]:
    """Train the ``cnn`` of width ``channels`` on ``ds`` and save its float64 ``state_dict`` to
    ``out``; returns what the training reports (final full-gradient norm, objective, seconds,
    train and test accuracy)."""
    t0 = time.perf_counter()
    module = _cnn(ds.input_shape, ds.n_classes, channels)
    torch.manual_seed(seed)
    objective = Objective(module, make_loss("cnn", svm_temperature=1.0), device=torch.device("cpu"),
                          dtype=dtype)
    x = torch.tensor(ds.x_train, dtype=dtype)  # (n, *input_shape)
    y = torch.tensor(ds.y_train)  # (n,)
    config = TrainConfig(channels=channels, epochs=epochs, polish_s=polish_s)
    result = train_network(objective, x, y, weight_decay=weight_decay, config=config, seed=seed)
    objective.load_flat(result.theta)
    module.eval()
    with torch.no_grad():
        acc = {split: float((module(torch.tensor(xs, dtype=dtype)).argmax(1)
                             == torch.tensor(ys)).double().mean())
               for split, xs, ys in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test))}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(torch.float64) for k, v in module.state_dict().items()}, out)
    info = {"grad_norm": result.grad_norm, "objective": result.objective,
            "seconds": time.perf_counter() - t0, "train_accuracy": acc["train"],
            "test_accuracy": acc["test"], "epochs": epochs, "polish_s": polish_s,
            "weight_decay": weight_decay, "train_dtype": str(dtype), "channels": list(channels)}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2))  # read back by training_info
    return info


def training_info(weights: Path) -> dict[str, object]:
    """What :func:`train_weights` reported when it wrote ``weights`` (its sidecar JSON), if known."""
    side = weights.with_suffix(".json")
    known = json.loads(side.read_text()) if side.is_file() else {}
    return {"reused": str(weights), **known}


def add_common_args(ap: argparse.ArgumentParser, *, epochs: int, polish_s: float, work: Path,
                    results: Path) -> None:
    """The options both benchmarks share: objective, training of θ̂, folders, threads."""
    ap.add_argument("--weight-decay", type=float, default=1e-3, help="λ")
    ap.add_argument("--damping", type=float, default=1e-3, help="δ (kronfluence's damping_factor is λ + δ)")
    ap.add_argument("--epochs", type=int, default=epochs, help="Adam epochs of the training")
    ap.add_argument("--polish-s", type=float, default=polish_s, help="L-BFGS polish seconds of the training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=Path, default=None, help="reuse a state_dict train_weights wrote")
    ap.add_argument("--work", type=Path, default=work, help="folder for the weights and the runs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=results)


def weights_for(args: argparse.Namespace, ds: Dataset, *, channels: tuple[int, ...]
                ) -> tuple[Path, dict[str, object]]:
    """``args.weights`` and what trained it, or freshly trained weights in ``args.work``."""
    if args.weights is not None:
        return args.weights, training_info(args.weights)
    weights = args.work / "weights.pt"
    info = train_weights(ds, channels=channels, out=weights, weight_decay=args.weight_decay, epochs=args.epochs,
                         polish_s=args.polish_s, seed=args.seed, dtype=torch.float32)
    print(f"trained: {info}", flush=True)
    return weights, dict(info)


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (as ``uptime`` prints them)."""
    return os.getloadavg()
