"""Settings of the engine as frozen dataclasses; every run saves them in ``run.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "AUTO_IHVP",
    "CONVEX_MODELS",
    "BuildConfig",
    "CGConfig",
    "IHVPMethod",
    "LissaConfig",
    "ModelKind",
    "TrainConfig",
]


class ModelKind(str, Enum):
    """Built-in model families (a user model is named by a path or ``module:factory``)."""

    LOGREG = "logreg"
    SVM = "svm"
    MLP = "mlp"
    CNN = "cnn"
    RESNET = "resnet"
    USER = "user"

    @property
    def convex(self) -> bool:
        """Whether the training objective is convex in θ (then θ̂ is trained to its exact optimum
        in float64, and λ + δ bounds the Hessian's spectrum from below)."""
        return self in CONVEX_MODELS


CONVEX_MODELS = frozenset({ModelKind.LOGREG, ModelKind.SVM})
NETWORK_MODELS = frozenset({ModelKind.MLP, ModelKind.CNN, ModelKind.RESNET})
WEIGHT_DECAY = 1e-2  # λ's default for convex and user models
NETWORK_WEIGHT_DECAY = 5e-4  # λ's default for the built-in networks (the usual weight decay: the
# resnet reaches 0.920 test accuracy on all of Fashion-MNIST with it, 0.875 with 1e-2)


def default_weight_decay(model: str) -> float:
    """λ when none is given: :data:`NETWORK_WEIGHT_DECAY` for a built-in network, else
    :data:`WEIGHT_DECAY`."""
    return NETWORK_WEIGHT_DECAY if model in {k.value for k in NETWORK_MODELS} else WEIGHT_DECAY


class IHVPMethod(str, Enum):
    """Strategies for ``H⁻¹v``."""

    EXACT = "exact"  # dense Hessian, Cholesky solve
    CG = "cg"  # block conjugate gradients on Hessian-vector products
    LISSA = "lissa"  # stochastic Neumann series (Agarwal et al. 2017)
    PROJECTED = "projected"  # k×k curvature PᵀHP in the projected gradient space
    FISHER = "fisher"  # damped empirical Fisher of the stored gradients (d×d, from the store)
    EKFAC = "ekfac"  # eigenvalue-corrected Kronecker-factored curvature per layer

    @property
    def needs_curvature_file(self) -> bool:
        """Whether a run built with this method keeps its curvature in ``curvature.pt``."""
        return self in (IHVPMethod.EXACT, IHVPMethod.PROJECTED, IHVPMethod.EKFAC)


AUTO_IHVP = "auto"  # a build's --ihvp default: a method that finishes in minutes for the model's size


@dataclass(frozen=True)
class CGConfig:
    """Block conjugate gradients (Galerkin projection on the block Krylov space)."""

    tol: float = 1e-8  # stop when every column's ‖Hx − b‖ / ‖b‖ is below this
    max_iter: int = 200  # block steps (each applies H to one block of directions)
    max_dim: int = 4096  # restart when the Krylov basis would exceed this many vectors
    # every query starts from one frozen deflation basis: the block Krylov space of `prime` seeded
    # random columns, built at the first query (0 turns it off), kept within basis_mb (Q and HQ)
    prime: int = 32
    prime_seed: int = 0
    prime_dim: int = 1024  # at most this many basis vectors (and max_dim / 2): bounds the first query's cost
    basis_mb: int = 256  # Q, HQ, QᵀHQ and its factor
    # a column is converged at max(tol, attainable_factor · eps · ‖H‖‖x‖/‖b‖): float32's floor
    attainable_factor: float = 4.0


@dataclass(frozen=True)
class LissaConfig:
    """LiSSA: ``x_j = b + (1 − damping)·x_{j−1} − H_batch x_{j−1} / scale``; the answer is the
    average of ``x_j / scale`` after a burn-in (see :mod:`engine.ihvp.lissa`).

    ``scale`` must exceed the largest eigenvalue of H; ``None`` estimates it by ``power_iters``
    steps of power iteration, times ``scale_margin``. The extra ``damping`` shifts the solved
    matrix to ``H + damping·scale·I``; keep it 0 to solve with the run's own H.
    """

    scale: float | None = None
    damping: float = 0.0
    depth: int = 1000  # most steps of each repeat (burn-in and averaging)
    repeats: int = 1
    batch_size: int = 128  # training points per stochastic Hessian-vector product
    tol: float = 1e-2  # burn-in ends when the truncation bound (1 − μ/scale)^j is below this
    residual_tol: float = 0.25  # stop, converged, once every column's ‖Hx − b‖/‖b‖ is at most this
    check_every: int = 100  # averaged steps between full-batch residual checks (≥ one pass over the data)
    seed: int = 0
    scale_margin: float = 1.25  # scale = this × the power-iteration estimate of H's top eigenvalue
    power_iters: int = 30


@dataclass(frozen=True)
class TrainConfig:
    """How networks are trained (convex models always run L-BFGS then Newton to optimum).

    Stopping criterion of a network (:func:`engine.models.train.train_network`): ``min(epochs,
    ⌈max_samples / n⌉)`` epochs (at least one) of minibatch ``optimizer`` with the learning rate
    annealed by ``schedule``, then full-batch L-BFGS until ``lbfgs_steps`` iterations, its
    tolerance, ``polish_s`` seconds or ``polish_share`` × the epochs' wall time, whichever first.
    """

    epochs: int = 150  # at most this many epochs (small data sets)
    max_samples: int = 200_000  # and at most ⌈this / n⌉ epochs: per-sample gradients of the epochs (0: no cap)
    lr: float = 1e-2
    batch_size: int = 64
    schedule: str = "cosine"  # cosine (learning rate annealed to 0 over the epochs) or constant
    lbfgs_steps: int = 500  # full-batch L-BFGS polish after the epochs, towards a stationary θ̂
    polish_s: float = 60.0  # the polish stops after this many seconds (0: no polish) ...
    polish_share: float = 0.25  # ... or this share of the epochs' wall time, whichever is less
    optimizer: str = "adam"  # adam or sgd (Nesterov momentum 0.9) for the epochs
    threads: int = 0  # at most this many PyTorch CPU threads while training (0: half the cores, ≥ 1)
    hidden: tuple[int, ...] = (32,)  # MLP hidden widths
    channels: tuple[int, ...] = (8, 16)  # CNN conv widths
    width: int = 16  # ResNet base width (64 is ResNet-18 itself)
    grad_tol: float = 1e-10  # convex models: Newton until ‖∇R‖ ≤ this (the contract asks < 1e-8)
    newton_max_params: int = 5000  # dense Newton steps (training, retraining, attacks) up to this p


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``build`` needs; saved in ``run.json`` and compared on reopen."""

    data: str
    model: str
    weight_decay: float | None = None  # None: default_weight_decay(model), resolved on creation
    damping: float = 0.0
    ihvp: IHVPMethod = IHVPMethod.EXACT
    project: int | None = None
    projection: str = "dense"  # dense (one Gaussian P) or kronecker (per layer P_outᵀ G P_in)
    kronecker_basis: str = "random"  # kronecker's P_in, P_out: seeded random, or pca (top eigenvectors
    # of each layer's input and output-gradient covariances, saved with the run)
    params: str | None = None  # fnmatch patterns of the tracked modules (None: every parameter)
    device: str = "auto"
    seed: int = 0
    train_size: int | None = None  # a seeded, stratified subset of the training split (None: all)
    test_size: int | None = None  # the same for the test split
    label_noise: float = 0.0  # flip this seeded fraction of training labels, recorded (mislabel checks)
    ensemble: int = 1  # independently seeded models, one store each; their scores averaged
    dtype: str = "auto"  # float64 for convex models, float32 for networks (the contract)
    store_dtype: str = "auto"  # the gradient store's dtype: auto (the compute dtype), float64,
    # float32, float16 or bfloat16 (2 bytes a value; scores accumulate in float32)
    weights: str | None = None  # state_dict for a ``module:factory`` user model
    svm_temperature: float = 0.01
    chunk_size: int = 512  # training points per per-sample-gradient block (and store write)
    train: TrainConfig = field(default_factory=TrainConfig)
    cg: CGConfig = field(default_factory=CGConfig)
    lissa: LissaConfig = field(default_factory=LissaConfig)

    def __post_init__(self) -> None:
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", default_weight_decay(self.model))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ihvp"] = self.ihvp.value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildConfig:
        d = dict(d)
        d["ihvp"] = IHVPMethod(d["ihvp"])
        tr = dict(d.get("train", {}))
        for key in ("hidden", "channels"):
            if key in tr:
                tr[key] = tuple(tr[key])
        d["train"] = TrainConfig(**tr)
        d["cg"] = CGConfig(**d.get("cg", {}))
        d["lissa"] = LissaConfig(**d.get("lissa", {}))
        return cls(**d)
