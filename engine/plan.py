"""Before a build: resolve its automatic choices and estimate its memory and time per stage.

:func:`plan_build` picks the IHVP method for ``--ihvp auto`` (:func:`auto_method`), measures one
forward + backward of the model on a small batch, and from that estimates every stage's time
and peak memory; :meth:`BuildPlan.check` refuses a build the machine cannot hold, naming the
stage and what to change. The estimates are printed before the build starts and recorded in
``run.json`` (``plan``) beside the measured timings, so they can be compared.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .config import AUTO_IHVP, BuildConfig, IHVPMethod, ModelKind
from .errors import InfluenceError, ModelError
from .grads.capture import capture
from .grads.layers import select_modules
from .grads.pca import PCA_MACS_PER_S, PCA_SAMPLES, covariance_macs, pca_sample_count
from .models.objective import Objective
from .models.threads import intra_op_threads
from .models.train import planned_epochs, polish_budget, polish_skipped
from .store.gradients import STORE_DTYPES

__all__ = ["EXACT_MAX_PARAMS", "PROJECTIONS", "BuildPlan", "Stage", "auto_method", "available_memory", "check_config",
           "check_method", "gpu_free_memory", "memory_limit", "plan_build"]

PROJECTIONS = ("dense", "kronecker")

EXACT_MAX_PARAMS = 10_000  # a dense p×p Hessian (800 MB in float64) at most
EXACT_MAX_WORK = 3e7  # p·n of an exact Hessian from HVPs (networks): ~minutes on 2 cores
CG_MAX_WORK = 3e8  # p·n for CG queries on full gradients (each query: tens of HVP passes)
PROBE_BATCH = 16
MEMORY_MARGIN = 0.85  # of the available memory a build may plan to use


def auto_method(*, kind: ModelKind, n_params: int, n_train: int, projected: bool, linear: bool,
                float64: bool = True) -> IHVPMethod:
    """The IHVP method ``--ihvp auto`` picks, in this order:

    - a projected store (dense or Kronecker): ``fisher`` (K×K from the store, no extra pass);
    - in float64, a convex model with p ≤ EXACT_MAX_PARAMS, or any model with p ≤ EXACT_MAX_PARAMS
      whose Hessian is a closed form (``linear``) or costs p·n ≤ EXACT_MAX_WORK: ``exact`` (not
      in float32, where a network's small Hessian eigenvalues are below working precision: a
      blobs MLP's H was refused as singular at 3.7e-5);
    - a convex model with p·n ≤ CG_MAX_WORK: ``cg`` (Hessian-vector products, exact to its
      tolerance; at a network's θ̂ H is indefinite and CG did not converge: a 5,000-image cnn's
      first query ran past 5 minutes);
    - otherwise ``ekfac`` (per-layer Kronecker factors: two passes over the data).
    """
    if projected:
        return IHVPMethod.FISHER
    if float64 and n_params <= EXACT_MAX_PARAMS and (
            kind.convex or linear or n_params * n_train <= EXACT_MAX_WORK):
        return IHVPMethod.EXACT
    if kind.convex and n_params * n_train <= CG_MAX_WORK:
        return IHVPMethod.CG
    return IHVPMethod.EKFAC


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable), or a large number if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


@dataclass(frozen=True)
class Stage:
    name: str
    seconds: float  # estimated wall time
    peak_bytes: int  # estimated peak memory beyond the model and data
    note: str = ""


def gpu_free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA ``device`` (``torch.cuda.mem_get_info``), or None off CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def memory_limit(device: torch.device) -> tuple[int, str]:
    """(bytes a build may plan with, where): the host's available memory, or on a GPU whose free
    memory is smaller, that (a build's stages hold their tensors on its device)."""
    host, gpu = available_memory(), gpu_free_memory(device)
    if gpu is not None and gpu < host:
        return gpu, f"GPU memory ({device})"
    return host, "memory"


@dataclass(frozen=True)
class BuildPlan:
    """The resolved method and the estimated stages of one build."""

    ihvp: IHVPMethod
    ihvp_requested: str
    n_params: int
    store_dim: int
    store_bytes: int
    forward_backward_s: float  # one sample's measured forward + backward
    stages: tuple[Stage, ...] = field(default_factory=tuple)
    available_bytes: int = 0
    available_where: str = "memory"  # or "GPU memory (cuda:0)" when the device's is the smaller

    @property
    def peak_bytes(self) -> int:
        return max((s.peak_bytes for s in self.stages), default=0)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ihvp"] = self.ihvp.value
        return out

    def lines(self) -> list[str]:
        """The plan as printed before a build."""
        out = [f"plan: {self.n_params:,} parameters, store {self.store_dim:,} per image "
               f"({_size(self.store_bytes)}), ihvp {self.ihvp.value}"
               + (f" (from {self.ihvp_requested})" if self.ihvp_requested != self.ihvp.value else "")]
        for s in self.stages:
            out.append(f"  {s.name:<11} ~{_duration(s.seconds):>8}  peak ~{_size(s.peak_bytes):>9}"
                       + (f"  {s.note}" if s.note else ""))
        out.append(f"  total       ~{_duration(self.seconds):>8}  peak ~{_size(self.peak_bytes):>9} "
                   f"of {_size(self.available_bytes)} {self.available_where} available")
        return out

    def check(self) -> None:
        """Refuse (InfluenceError) a build whose estimated peak memory the machine cannot hold."""
        limit = MEMORY_MARGIN * self.available_bytes
        for s in self.stages:
            if s.peak_bytes > limit:
                raise InfluenceError(
                    f"the {s.name} stage would need about {_size(s.peak_bytes)} of {self.available_where} "
                    f"and {_size(self.available_bytes)} is available{': ' + s.note if s.note else ''}")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def forward_backward_seconds(objective: Objective, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds per sample of a plain forward + backward of the model (measured on a small batch)."""
    xb = x[:PROBE_BATCH].to(objective.device, objective.dtype)
    yb = y[:PROBE_BATCH].to(objective.device)
    model = objective.model
    best = math.inf
    with objective.holding():
        for _ in range(2):
            t = time.perf_counter()
            with torch.enable_grad():
                params = [p for p in model.parameters() if p.requires_grad]
                loss = objective.loss_fn(model(xb), yb)
                if params:
                    torch.autograd.grad(loss, params)
            best = min(best, time.perf_counter() - t)
    return best / max(len(xb), 1)


def _training_stage(config: BuildConfig, objective: Objective, x: torch.Tensor, y: torch.Tensor, *,
                    convex: bool, fb: float) -> Stage:
    """Training's estimate: convex models ``epochs · n`` forward + backward passes (a rough
    bound of the L-BFGS and Newton work); networks their planned epochs at the training thread
    count (measured under it), plus the polish's budget."""
    tc, n, p = config.train, len(x), objective.n_params
    peak = 4 * p * torch.empty((), dtype=objective.dtype).element_size()  # θ, its gradient, Adam's moments
    if convex:
        return Stage("training", tc.epochs * n * fb, peak)
    with intra_op_threads(tc.threads):
        fb_train = forward_backward_seconds(objective, x, y)
    epochs = planned_epochs(tc, n)
    epochs_s = epochs * n * fb_train
    polish_s = polish_budget(tc, epochs_s=epochs_s)
    if polish_s > 0 and polish_skipped(polish_s, epochs_s=epochs_s, epochs=epochs):
        return Stage("training", epochs_s, peak, f"{epochs} epochs, polish skipped (an epoch outlasts its "
                     f"{polish_s:.0f} s)")
    return Stage("training", epochs_s + polish_s, peak,
                 f"{epochs} epochs, polish ≤ {polish_s:.0f} s" if polish_s > 0 else f"{epochs} epochs, no polish")


def _covariance_macs(objective: Objective, x: torch.Tensor, y: torch.Tensor, *, params: str | None) -> int | None:
    """Multiply-adds one sample costs the pca bases' layer covariances (one capture of x[:1]),
    or None where the layers cannot be captured (a TorchScript model, a module the layer-wise
    path does not handle: the gradient space says why when the build makes it)."""
    if not objective.functional:
        return None
    try:
        selection = select_modules(objective.model, params)
    except ModelError:
        return None
    caps = capture(objective.model, objective.loss_fn, x[:1].to(objective.device, objective.dtype),
                   y[:1].to(objective.device), selection=selection)
    return covariance_macs(caps)


def plan_build(config: BuildConfig, objective: Objective, x: torch.Tensor, y: torch.Tensor, *,
               kind: ModelKind, n_test: int, linear: bool, ihvp_requested: str) -> BuildPlan:
    """Resolve ``auto`` and estimate the stages of building ``config`` (x, y: the training set)."""
    n, p = len(x), objective.n_params
    itemsize = torch.empty((), dtype=objective.dtype).element_size()
    k = config.project
    store_dim = k or p
    store_item = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}.get(config.store_dtype, itemsize)
    ihvp = (auto_method(kind=kind, n_params=p, n_train=n, projected=bool(k), linear=linear,
                        float64=objective.dtype == torch.float64)
            if ihvp_requested == AUTO_IHVP else config.ihvp)
    fb = forward_backward_seconds(objective, x, y)
    stages: list[Stage] = []
    if kind is not ModelKind.USER:
        stages.append(_training_stage(config, objective, x, y, convex=kind.convex, fb=fb))
    kron = k and config.projection == "kronecker"
    chunk = config.chunk_size
    if kron:
        grad_s, grad_peak, note = n * fb * 1.5, 256 * store_dim * itemsize, "layer-wise, Kronecker-projected"
    else:
        grad_s = n * fb * 3 + (n * p * k * 2 / 2e10 if k else 0)
        grad_peak = chunk * p * itemsize + (min(p * k * itemsize, 1 << 30) if k else 0)
        note = ("per-sample gradients (chunk, p) whole" + (" and the dense P (p, K)" if k else "")
                + "; for a large network use --projection kronecker --project K --store-dtype float16")
    store_bytes = n * store_dim * store_item
    if kron and config.kronecker_basis == "pca":  # one raw capture pass over the points the budget allows
        per_sample = _covariance_macs(objective, x, y, params=config.params)
        samples = pca_sample_count(n, per_sample) if per_sample else min(n, PCA_SAMPLES)
        stages.append(Stage("kronecker bases", samples * (fb * 3 + (per_sample or 0) / PCA_MACS_PER_S),
                            3 * p * itemsize, f"layer covariances of {samples:,} points and their eigenvectors"))
    stages.append(Stage("gradients", grad_s, grad_peak + store_bytes, note))
    if ihvp is IHVPMethod.EXACT:
        curv_s = 0.0 if linear else p * n * fb * 2 / 32
        stages.append(Stage("curvature", curv_s, 3 * p * p * 8, "a dense p×p Hessian (exact)"))
    elif ihvp is IHVPMethod.PROJECTED:
        stages.append(Stage("curvature", (k or 0) * n * fb * 2 / 32, 3 * store_dim**2 * 8, "K HVP columns PᵀHP"))
    elif ihvp is IHVPMethod.EKFAC:  # covariances during the store pass, Λ from the rows in memory
        stages.append(Stage("curvature", n * fb * 0.5, 2 * store_dim * 8,
                            "factors from the store pass (a capture pass more if resumed)"))
    elif ihvp is IHVPMethod.FISHER:
        stages.append(Stage("curvature", n * store_dim**2 * 2 / 2e10, 3 * store_dim**2 * 8,
                            "the K×K Fisher, at the first query"))
    limit, where = memory_limit(objective.device)
    return BuildPlan(ihvp=ihvp, ihvp_requested=ihvp_requested, n_params=p, store_dim=store_dim,
                     store_bytes=store_bytes, forward_backward_s=fb, stages=tuple(stages),
                     available_bytes=limit, available_where=where)


def check_config(config: BuildConfig, requested: str) -> None:
    """Refuse (InfluenceError) settings that are out of range or do not go together."""
    if not config.weight_decay >= 0:
        raise InfluenceError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if not config.damping >= 0:
        raise InfluenceError(f"--damping must be >= 0, got {config.damping}")
    if config.project is not None and config.project < 1:
        raise InfluenceError(f"--project must be a positive integer, got {config.project}")
    if config.projection not in PROJECTIONS:
        raise InfluenceError(f"--projection must be one of {', '.join(PROJECTIONS)}, got {config.projection!r}")
    if config.projection == "kronecker" and config.project is None:
        raise InfluenceError("--projection kronecker needs --project K (the store's dimension)")
    if config.kronecker_basis not in ("random", "pca"):
        raise InfluenceError(f"--kronecker-basis must be random or pca, got {config.kronecker_basis!r}")
    if config.kronecker_basis == "pca" and (config.projection != "kronecker" or config.project is None):
        raise InfluenceError("--kronecker-basis pca needs --projection kronecker --project K")
    if requested != AUTO_IHVP:
        check_method(config)
    if not config.svm_temperature > 0:
        raise InfluenceError(f"--svm-temperature must be > 0, got {config.svm_temperature}")
    if config.chunk_size < 1:
        raise InfluenceError(f"chunk size must be >= 1, got {config.chunk_size}")
    if not 0 <= config.label_noise < 1:
        raise InfluenceError(f"--label-noise must be a fraction in [0, 1), got {config.label_noise}")
    if config.store_dtype != "auto" and config.store_dtype not in STORE_DTYPES:
        raise InfluenceError(f"--store-dtype must be auto or one of {', '.join(STORE_DTYPES)}, "
                             f"got {config.store_dtype!r}")


def check_method(config: BuildConfig) -> None:
    """The IHVP method fits the store: HVP-based methods need full gradients; ``projected`` a
    dense projection; ``ekfac`` layers (full or Kronecker-projected)."""
    m, k = config.ihvp, config.project
    if m is IHVPMethod.PROJECTED and (k is None or config.projection != "dense"):
        raise InfluenceError("--ihvp projected needs --project K with --projection dense")
    if m in (IHVPMethod.EXACT, IHVPMethod.CG, IHVPMethod.LISSA) and k is not None:
        raise InfluenceError(f"--ihvp {m.value} needs full gradients: drop --project, or use "
                             "--ihvp fisher (or projected, ekfac) with a projected store")
    if m is IHVPMethod.EKFAC and k is not None and config.projection == "dense":
        raise InfluenceError("--ihvp ekfac needs layers: use --projection kronecker (or no --project)")
