"""Settings of the engine as frozen dataclasses; every run saves them in ``run.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "ModelKind",
    "IHVPMethod",
    "CGConfig",
    "LissaConfig",
    "TrainConfig",
    "BuildConfig",
    "CONVEX_MODELS",
]


class ModelKind(str, Enum):
    """Built-in model families (a user model is named by a path or ``module:factory``)."""

    LOGREG = "logreg"
    SVM = "svm"
    MLP = "mlp"
    CNN = "cnn"
    USER = "user"


CONVEX_MODELS = frozenset({ModelKind.LOGREG, ModelKind.SVM})


class IHVPMethod(str, Enum):
    """Strategies for ``H⁻¹v``."""

    EXACT = "exact"  # dense Hessian, Cholesky solve
    CG = "cg"  # block conjugate gradients on Hessian-vector products
    LISSA = "lissa"  # stochastic Neumann series (Agarwal et al. 2017)
    PROJECTED = "projected"  # k×k curvature PᵀHP in the projected gradient space


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


@dataclass(frozen=True)
class LissaConfig:
    """LiSSA: ``x_j = b + (1 − damping)·x_{j−1} − H_batch x_{j−1} / scale``, answer ``x / scale``.

    ``scale`` must exceed the largest eigenvalue of H; ``None`` estimates it by power iteration
    (×1.25). The extra ``damping`` shifts the solved matrix to ``H + damping·scale·I``; keep it 0
    to solve with the run's own H.
    """

    scale: float | None = None
    damping: float = 0.0
    depth: int = 1000
    repeats: int = 1
    batch_size: int = 128  # training points per stochastic Hessian-vector product
    tol: float = 1e-3  # converged when the truncation bias bound (1 − μ/scale)^depth is below this
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """How networks are trained (convex models always run L-BFGS then Newton to optimum)."""

    epochs: int = 150
    lr: float = 1e-2
    batch_size: int = 64
    lbfgs_steps: int = 500  # full-batch L-BFGS polish after Adam, to a near-stationary θ̂
    hidden: tuple[int, ...] = (32,)  # MLP hidden widths
    channels: tuple[int, ...] = (8, 16)  # CNN conv widths


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``build`` needs; saved in ``run.json`` and compared on reopen."""

    data: str
    model: str
    weight_decay: float = 1e-2
    damping: float = 0.0
    ihvp: IHVPMethod = IHVPMethod.EXACT
    project: int | None = None
    device: str = "auto"
    seed: int = 0
    dtype: str = "auto"  # float64 on the CPU, float32 on a GPU
    store_dtype: str = "auto"  # the gradient store's dtype: auto (the compute dtype), float64,
    # float32, float16 or bfloat16 (2 bytes a value; scores accumulate in float32)
    weights: str | None = None  # state_dict for a ``module:factory`` user model
    svm_temperature: float = 0.01
    chunk_size: int = 512  # training points per per-sample-gradient block (and store write)
    train: TrainConfig = field(default_factory=TrainConfig)
    cg: CGConfig = field(default_factory=CGConfig)
    lissa: LissaConfig = field(default_factory=LissaConfig)

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
