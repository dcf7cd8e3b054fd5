"""``build``: data → θ̂ → per-sample gradients → store + curvature → a run folder.

Everything is written into a temporary sibling folder and renamed into place at the end, so an
interrupted build leaves nothing that looks like a run.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import CONVEX_MODELS, BuildConfig, IHVPMethod, ModelKind
from .data import fingerprint, load_data
from .errors import InfluenceError, RunError
from .grads.per_sample import per_sample_grads
from .grads.projection import Projector
from .ihvp import dense_hessian, full_hvp, largest_eigenvalue, projected_curvature
from .models import build_dtype, make_module, make_objective, model_fingerprint, model_kind, resolve_device
from .models.svm import hinge_kkt_residual, hinge_objective, train_hinge_svm
from .models.svm import to_flat as svm_to_flat
from .models.train import objective_value_and_grad, train_convex, train_network
from .run import CURVATURE_FILE, RUN_FILE, RUN_SCHEMA, SCRIPT_FILE, THETA_FILE, Run, parse_method
from .store.files import save_json, save_tensors
from .store.gradients import StoreWriter

__all__ = ["build", "ENGINE_VERSION"]

ENGINE_VERSION = "0.1.0"


def _check(config: BuildConfig) -> None:
    if not config.weight_decay >= 0:
        raise InfluenceError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if not config.damping >= 0:
        raise InfluenceError(f"--damping must be >= 0, got {config.damping}")
    if config.project is not None and config.project < 1:
        raise InfluenceError(f"--project must be a positive integer, got {config.project}")
    if (config.project is not None) != (config.ihvp is IHVPMethod.PROJECTED):
        raise InfluenceError("--ihvp projected and --project K go together: give both or neither")
    if not config.svm_temperature > 0:
        raise InfluenceError(f"--svm-temperature must be > 0, got {config.svm_temperature}")
    if config.chunk_size < 1:
        raise InfluenceError(f"chunk size must be >= 1, got {config.chunk_size}")


def _accuracy(run_logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((run_logits.argmax(1) == y).double().mean())


def build(data: str, model: str, out: str | Path, *, weight_decay: float = 1e-2,
          damping: float = 0.0, ihvp: str = "exact", project: int | None = None,
          device: str = "auto", seed: int = 0, force: bool = False, progress: bool = True,
          **options: Any) -> Run:
    """Build a run folder at ``out`` and return it opened.

    ``options`` sets any other :class:`~engine.config.BuildConfig` field (``dtype``, ``weights``,
    ``svm_temperature``, ``chunk_size``, ``train``, ``cg``, ``lissa``). Refuses an existing
    ``out`` unless ``force``.
    """
    method = parse_method(ihvp)
    assert method is not None
    data_spec = data if data == "digits" else str(Path(data).resolve())
    model_spec = model
    if model_kind(model) is ModelKind.USER and Path(model).is_file():
        model_spec = str(Path(model).resolve())
    try:
        config = BuildConfig(data=data_spec, model=model_spec, weight_decay=float(weight_decay),
                             damping=float(damping), ihvp=method, project=project, device=device,
                             seed=int(seed), **options)
    except TypeError as exc:
        raise InfluenceError(f"unknown build option: {exc}") from exc
    _check(config)
    out = Path(out)
    if out.exists():
        if not force:
            raise RunError(f"{out} already exists; choose another --out or pass --force to replace it")
        if not (out / RUN_FILE).is_file():
            raise RunError(f"{out} exists and is not a run folder; --force only replaces runs")
    created = [d for d in [out.parent, *out.parent.parents] if not d.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        info = _build_into(tmp, config, progress=progress)
        save_json(tmp / RUN_FILE, info)
        if out.exists():
            old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            out.rename(old)  # keep the old run until the new one is in place
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first: remove only folders this build made and left empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    from .run import open_run

    return open_run(out)


def _build_into(folder: Path, config: BuildConfig, *, progress: bool) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    kind = model_kind(config.model)
    dev = resolve_device(config.device)
    dtype = build_dtype(config, dev)
    ds = load_data(config.data, seed=config.seed)
    data_fp = fingerprint(ds)
    timings["load_data_s"] = time.perf_counter() - t0
    module = make_module(config, input_shape=ds.input_shape, n_classes=ds.n_classes)
    obj = make_objective(module, config, device=dev, dtype=dtype)
    x = torch.from_numpy(np.array(ds.x_train)).to(dev, dtype)
    y = torch.from_numpy(np.array(ds.y_train)).to(dev)
    x_test = torch.from_numpy(np.array(ds.x_test)).to(dev, dtype)
    y_test = torch.from_numpy(np.array(ds.y_test)).to(dev)

    # ---- θ̂
    t = time.perf_counter()
    lam = config.weight_decay
    if kind is ModelKind.USER:
        theta = obj.flat_params()
        _, g = objective_value_and_grad(obj, theta, x, y, weight_decay=lam)
        train_info: dict[str, Any] = {"trained": False, "grad_norm": float(g.norm())}
    elif kind is ModelKind.SVM:  # the true hinge (liblinear); influence uses the smooth hinge
        xs, ys = np.asarray(ds.x_train), np.asarray(ds.y_train)
        rows = train_hinge_svm(xs, ys, n_classes=ds.n_classes, weight_decay=lam, seed=config.seed)
        theta = torch.from_numpy(svm_to_flat(rows)).to(dev, dtype)
        _, g = objective_value_and_grad(obj, theta, x, y, weight_decay=lam)
        kkt = hinge_kkt_residual(rows, xs, ys, weight_decay=lam)
        train_info = {"trained": True, "loss": "hinge", "solver": "liblinear dual coordinate descent",
                      "grad_norm": kkt, "kkt_residual": kkt, "smooth_grad_norm": float(g.norm()),
                      "objective": hinge_objective(rows, xs, ys, weight_decay=lam)}
    elif kind in CONVEX_MODELS:
        msgs: list[str] = []
        res = train_convex(obj, x, y, weight_decay=lam, log=msgs.append)
        theta = res.theta
        train_info = {"trained": True, "grad_norm": res.grad_norm, "objective": res.objective,
                      "iterations": res.iterations, "log": msgs}
    else:
        with tqdm(total=config.train.epochs, desc="train", unit="epoch", disable=not progress,
                  file=sys.stderr) as bar:
            res = train_network(obj, x, y, weight_decay=lam, config=config.train,
                                seed=config.seed, epoch_bar=bar.update)
        theta = res.theta
        train_info = {"trained": True, "grad_norm": res.grad_norm, "objective": res.objective,
                      "iterations": res.iterations}
    obj.load_flat(theta)
    with torch.no_grad():
        train_info["train_accuracy"] = _accuracy(obj.logits(theta, x), y)
        train_info["test_accuracy"] = _accuracy(obj.logits(theta, x_test), y_test)
    train_info["convex"] = kind in CONVEX_MODELS
    timings["train_s"] = time.perf_counter() - t
    model_fp = model_fingerprint(obj, theta)
    save_tensors(folder / THETA_FILE, {"theta": theta})
    if kind is ModelKind.USER and ":" not in config.model:
        shutil.copyfile(config.model, folder / SCRIPT_FILE)

    # ---- per-sample gradients → store
    t = time.perf_counter()
    projector = (Projector(obj.n_params, config.project, seed=config.seed, dtype=dtype, device=dev)
                 if config.project else None)
    dim = config.project or obj.n_params
    store_dtype = {torch.float64: "float64", torch.float32: "float32"}[dtype]
    writer = StoreWriter(folder, n=ds.n_train, dim=dim, dtype=store_dtype)
    with tqdm(total=ds.n_train, desc="gradients", unit="img", disable=not progress,
              file=sys.stderr) as bar:
        per_sample_grads(obj, theta, x, y, chunk_size=config.chunk_size, projector=projector,
                         sink=writer.write, progress=bar.update)
    manifest = writer.finish({
        "data_fingerprint": data_fp, "model_fingerprint": model_fp,
        "projection": {"k": config.project, "seed": config.seed} if config.project else None,
    })
    timings["gradients_s"] = time.perf_counter() - t

    # ---- curvature
    t = time.perf_counter()
    shift = config.weight_decay + config.damping
    hvp = full_hvp(obj, theta, x, y, shift=shift)
    curvature: dict[str, Any] = {"method": config.ihvp.value, "shift": shift}
    if config.ihvp is IHVPMethod.EXACT:
        with tqdm(total=obj.n_params, desc="hessian", unit="col", disable=not progress,
                  file=sys.stderr) as bar:
            h = dense_hessian(hvp, obj.n_params, dtype=dtype, device=dev, progress=bar.update)
        save_tensors(folder / CURVATURE_FILE, {"hessian": h})
    elif config.ihvp is IHVPMethod.PROJECTED:
        assert projector is not None
        save_tensors(folder / CURVATURE_FILE, {"projected": projected_curvature(hvp, projector)})
    elif config.ihvp is IHVPMethod.LISSA and config.lissa.scale is None:
        curvature["lissa_scale"] = 1.25 * largest_eigenvalue(
            hvp, obj.n_params, dtype=dtype, device=dev, seed=config.lissa.seed)
    timings["curvature_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    return {
        "schema_version": RUN_SCHEMA,
        "config": config.to_dict(),
        "data": {"source": config.data, "fingerprint": data_fp, "n_train": ds.n_train,
                 "n_test": ds.n_test, "input_shape": list(ds.input_shape),
                 "n_classes": ds.n_classes, "class_names": list(ds.class_names)},
        "model": {"kind": kind.value, "spec": config.model, "n_params": obj.n_params,
                  "dtype": str(dtype).replace("torch.", ""), "fingerprint": model_fp,
                  "parameters": [{"name": n, "shape": list(s)}
                                 for n, s in zip(obj.names, obj.shapes)]},
        "objective": {"weight_decay": config.weight_decay, "damping": config.damping,
                      "loss": "smooth_hinge" if kind is ModelKind.SVM else "cross_entropy",
                      "svm_temperature": config.svm_temperature if kind is ModelKind.SVM else None},
        "training": train_info,
        "store": manifest,
        "curvature": curvature,
        "timings": timings,
        "device": str(dev),
        "versions": {"engine": ENGINE_VERSION, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


