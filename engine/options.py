"""The build's command-line options, defined once from :class:`~engine.config.BuildConfig`.

``influence build`` (``app/cli.py``) and ``python -m engine.distributed`` both call
:func:`add_build_options` and :func:`build_kwargs`, so a default lives in the config dataclass
alone and every entry point reads it from there.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .config import AUTO_IHVP, NETWORK_WEIGHT_DECAY, WEIGHT_DECAY, BuildConfig, IHVPMethod, TrainConfig

__all__ = ["STORE_DTYPE_CHOICES", "add_build_options", "build_kwargs", "config_default"]

STORE_DTYPE_CHOICES = ("auto", "float64", "float32", "float16", "bfloat16")


def config_default(name: str, cls: type = BuildConfig) -> Any:
    """The default of field ``name`` of a config dataclass."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def add_build_options(p: argparse.ArgumentParser) -> None:
    """Every option of a build, with its default and help taken from the config."""
    d = config_default
    p.add_argument("--data", required=True,
                   help="digits, fashion-mnist, idx:DIR, PATH.npz or an image folder")
    p.add_argument("--model", required=True,
                   help="logreg, svm, mlp, cnn, resnet, a TorchScript file, or package.module:factory")
    p.add_argument("--out", required=True, type=Path, help="run folder to create")
    p.add_argument("--weight-decay", type=float, default=None,
                   help=f"λ of the objective ({WEIGHT_DECAY:g} for logreg, svm and user models, "
                        f"{NETWORK_WEIGHT_DECAY:g} for mlp, cnn and resnet)")
    p.add_argument("--damping", type=float, default=d("damping"), help=f"δ added to the Hessian ({d('damping')})")
    p.add_argument("--ihvp", choices=[AUTO_IHVP, *(m.value for m in IHVPMethod)], default=AUTO_IHVP,
                   help="the run's IHVP method (auto: exact for small models, fisher for projected "
                        "stores, cg or ekfac for larger networks; see engine/plan.py)")
    p.add_argument("--project", type=int, default=d("project"), metavar="K",
                   help="store gradients projected to K dims (with --ihvp fisher, projected or ekfac)")
    p.add_argument("--projection", choices=("dense", "kronecker"), default=d("projection"),
                   help="dense: one Gaussian P (p, K); kronecker: per layer P_outᵀ G P_in from the "
                        "layer's inputs and output gradients, never forming G (large networks)")
    p.add_argument("--kronecker-basis", choices=("random", "pca"), default=d("kronecker_basis"),
                   help="kronecker's per-layer P_in, P_out: seeded random, or pca: the top eigenvectors "
                        "of each layer's input and output-gradient covariances (saved with the run)")
    p.add_argument("--params", default=d("params"), metavar="PATTERNS",
                   help="comma-separated fnmatch patterns of the modules whose parameters are "
                        "tracked (e.g. fc: last-layer influence); default every parameter")
    p.add_argument("--device", default=d("device"), help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=d("seed"))
    p.add_argument("--train-size", type=int, default=d("train_size"), metavar="N",
                   help="a seeded, stratified subset of N training points (all)")
    p.add_argument("--test-size", type=int, default=d("test_size"), metavar="M",
                   help="a seeded, stratified subset of M test points (all)")
    p.add_argument("--label-noise", type=float, default=d("label_noise"), metavar="F",
                   help="flip a seeded fraction F of the training labels to another class and "
                        "record which (for `influence mislabels`); 0: none")
    p.add_argument("--ensemble", type=int, default=d("ensemble"), metavar="N",
                   help="N independently seeded models (training seeds S..S+N-1), one store each "
                        "under OUT/members/; queries average their scores and show how consistent "
                        "each listed point is across them (networks only; N times the build)")
    p.add_argument("--dtype", default=d("dtype"), choices=("auto", "float64", "float32"))
    p.add_argument("--store-dtype", default=d("store_dtype"), choices=STORE_DTYPE_CHOICES,
                   help="gradient store dtype (auto: the compute dtype); float16/bfloat16 halve "
                        "the store of a large projected run, scores accumulate in float32")
    p.add_argument("--chunk-size", type=int, default=d("chunk_size"),
                   help=f"training points per per-sample-gradient block and store write ({d('chunk_size')})")
    p.add_argument("--weights", default=d("weights"), help="state_dict for a module:factory model")
    p.add_argument("--svm-temperature", type=float, default=d("svm_temperature"),
                   help=f"temperature t of the smooth hinge svm influence goes through ({d('svm_temperature')})")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"at most N training epochs for networks ({config_default('epochs', TrainConfig)}); also "
                        f"capped at ⌈{config_default('max_samples', TrainConfig):,} / n⌉")
    p.add_argument("--width", type=int, default=None,
                   help=f"resnet base width ({config_default('width', TrainConfig)}; 64 is ResNet-18)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=None,
                   help=f"network training ({config_default('optimizer', TrainConfig)})")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed build of the same settings from its .OUT.partial folder")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def build_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`engine.build` (after data, model, out) from parsed options."""
    out: dict[str, Any] = {
        "weight_decay": args.weight_decay, "damping": args.damping, "ihvp": args.ihvp,
        "project": args.project, "projection": args.projection, "params": args.params,
        "kronecker_basis": args.kronecker_basis,
        "device": args.device, "seed": args.seed,
        "train_size": args.train_size, "test_size": args.test_size, "dtype": args.dtype,
        "label_noise": args.label_noise, "ensemble": args.ensemble,
        "store_dtype": args.store_dtype, "chunk_size": args.chunk_size, "weights": args.weights,
        "svm_temperature": args.svm_temperature, "force": args.force, "resume": args.resume,
    }
    train = {k: getattr(args, k) for k in ("epochs", "width", "optimizer") if getattr(args, k) is not None}
    if train:
        out["train"] = TrainConfig(**train)
    return out
