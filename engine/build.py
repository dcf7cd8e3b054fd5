"""``build``: data → θ̂ → per-sample gradients → store + curvature → a run folder.

Everything is written into the partial build folder ``.<name>.partial`` next to ``out`` and the
folder is renamed into place at the end (``run.json`` written last, just before), so an
interrupted build leaves nothing that looks like a run. The partial folder records each finished
stage in ``build-state.json`` (θ̂ with ``model.pt``, the store with its per-row done bitmap, the
curvature), so a build killed at any point continues where it stopped with ``resume=True``
(``influence build ... --resume``): it refuses a partial folder built with other settings, and a
build without ``resume`` starts afresh. A Python exception (including Ctrl-C) still removes the
partial folder; a killed process (SIGKILL, out of memory, preemption) leaves it to resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import BuildConfig, IHVPMethod, ModelKind
from .data import BUILTIN_DATA, IDX_PREFIX, Dataset, fingerprint, load_data
from .distributed import Comm, LocalComm, reduced_hessian, reduced_hvp, shard_rows
from .errors import InfluenceError, RunError
from .grads.per_sample import per_sample_grads
from .grads.projection import Projector
from .ihvp import data_hessian, full_hvp, projected_curvature
from .models import build_dtype, make_module, make_objective, model_fingerprint, model_kind, resolve_device
from .models.svm import hinge_kkt_residual, hinge_objective, train_hinge_svm
from .models.svm import to_flat as svm_to_flat
from .models.train import objective_value_and_grad, train_convex, train_network
from .run import Run
from .runinfo import CURVATURE_FILE, RUN_FILE, RUN_SCHEMA, SCRIPT_FILE, THETA_FILE, RunInfo
from .solvers import lissa_scale, parse_method
from .store.files import load_json, load_tensors, save_json, save_tensors
from .store.gradients import DONE_FILE, GRADS_FILE, MANIFEST_FILE, STORE_DTYPES, StoreWriter

__all__ = ["ENGINE_VERSION", "STATE_FILE", "build", "partial_folder"]

logger = logging.getLogger(__name__)

ENGINE_VERSION = "0.1.0"
STATE_FILE = "build-state.json"  # in the partial folder only: settings and finished stages
RESUME_IGNORES = ("chunk_size",)  # settings a resumed build may change (results do not depend on them)


def partial_folder(out: Path) -> Path:
    """The folder a build of ``out`` writes into before renaming it to ``out``."""
    return out.parent / f".{out.name}.partial"


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
    if config.store_dtype != "auto" and config.store_dtype not in STORE_DTYPES:
        raise InfluenceError(f"--store-dtype must be auto or one of {', '.join(STORE_DTYPES)}, "
                             f"got {config.store_dtype!r}")


def _data_spec(data: str) -> str:
    """A data spec with its path made absolute (built-in names stay as they are)."""
    if data in BUILTIN_DATA:
        return data
    if data.startswith(IDX_PREFIX):
        return IDX_PREFIX + str(Path(data[len(IDX_PREFIX):]).resolve())
    return str(Path(data).resolve())


def _accuracy(run_logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((run_logits.argmax(1) == y).double().mean())


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The settings as JSON holds them (tuples become lists), less what a resume may change."""
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in RESUME_IGNORES}


def _resume_state(tmp: Path, config: BuildConfig, resume: bool) -> bool:
    """Whether the partial folder ``tmp`` is continued; refuses one built with other settings."""
    if not resume or not tmp.is_dir():
        return False
    state_path = tmp / STATE_FILE
    if not state_path.is_file():
        return False  # killed before it recorded anything: nothing to keep
    state = load_json(state_path)
    if not isinstance(state, dict) or _comparable(state.get("config", {})) != _comparable(config.to_dict()):
        raise RunError(f"{tmp}: the interrupted build there has other settings; build without "
                       "--resume to start afresh (or repeat its settings)")
    return True


def build(data: str, model: str, out: str | Path, *, force: bool = False, progress: bool = True,
          resume: bool = False, comm: Comm | None = None, **options: Any) -> Run:
    """Build a run folder at ``out`` and return it opened.

    ``options`` sets any :class:`~engine.config.BuildConfig` field (``weight_decay``,
    ``damping``, ``ihvp``, ``project``, ``device``, ``seed``, ``train_size``, ``test_size``,
    ``dtype``, ``store_dtype``, ``weights``, ``svm_temperature``, ``chunk_size``, ``train``,
    ``cg``, ``lissa``); what is not given takes the config's default. Refuses an existing ``out`` unless ``force``. ``resume`` continues a killed
    build of the same settings from its partial folder. ``comm`` (see :mod:`engine.distributed`)
    spreads the work over processes; then only rank 0 returns the run (the others return None).
    """
    comm = comm or LocalComm()
    if "ihvp" in options:
        options["ihvp"] = parse_method(options["ihvp"])
    data_spec = _data_spec(data)
    model_spec = model
    if model_kind(model) is ModelKind.USER and Path(model).is_file():
        model_spec = str(Path(model).resolve())
    try:
        config = BuildConfig(data=data_spec, model=model_spec, **options)
    except TypeError as exc:
        raise InfluenceError(f"unknown build option: {exc}") from exc
    _check(config)
    out = Path(out)
    if out.exists():
        if not force:
            raise RunError(f"{out} already exists; choose another --out or pass --force to replace it")
        if not (out / RUN_FILE).is_file():
            raise RunError(f"{out} exists and is not a run folder; --force only replaces runs")
    tmp = partial_folder(out)
    resuming = _resume_state(tmp, config, resume)  # every rank decides the same, before any write
    comm.barrier()
    created = [d for d in [out.parent, *out.parent.parents] if not d.exists()]
    if comm.is_root:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not resuming:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_json(tmp / STATE_FILE, {"config": config.to_dict()})
    comm.barrier()
    try:
        info, ds = _build_into(tmp, config, progress=progress and comm.is_root, comm=comm)
        if comm.is_root:
            for leftover in (STATE_FILE, DONE_FILE):
                (tmp / leftover).unlink(missing_ok=True)
            save_json(tmp / RUN_FILE, info)
            if out.exists():
                old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
                out.rename(old)  # keep the old run until the new one is in place
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
    except BaseException:
        if comm.is_root:
            shutil.rmtree(tmp, ignore_errors=True)
            for d in created:  # innermost first: remove only folders this build made and left empty
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise
    comm.barrier()
    if not comm.is_root:
        return None  # type: ignore[return-value]
    return Run(out, RunInfo.from_dict(load_json(out / RUN_FILE), where=out / RUN_FILE), dataset=ds)  # the data as loaded, not read again


def _store_dtype(config: BuildConfig, dtype: torch.dtype) -> str:
    if config.store_dtype != "auto":
        return config.store_dtype
    return {torch.float64: "float64", torch.float32: "float32"}[dtype]


def _train(config: BuildConfig, kind: ModelKind, obj: Any, ds: Any, x: torch.Tensor, y: torch.Tensor,
           *, dev: torch.device, dtype: torch.dtype, progress: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """θ̂ (p,) and what training reports."""
    lam = config.weight_decay
    if kind is ModelKind.USER:
        theta = obj.flat_params()
        _, g = objective_value_and_grad(obj, theta, x, y, weight_decay=lam)
        return theta, {"trained": False, "grad_norm": float(g.norm())}
    if kind is ModelKind.SVM:  # the true hinge (liblinear); influence uses the smooth hinge
        xs, ys = np.asarray(ds.x_train), np.asarray(ds.y_train)
        rows = train_hinge_svm(xs, ys, n_classes=ds.n_classes, weight_decay=lam, seed=config.seed)
        theta = torch.from_numpy(svm_to_flat(rows)).to(dev, dtype)
        _, g = objective_value_and_grad(obj, theta, x, y, weight_decay=lam)
        kkt = hinge_kkt_residual(rows, xs, ys, weight_decay=lam)
        return theta, {"trained": True, "loss": "hinge", "solver": "liblinear dual coordinate descent",
                       "grad_norm": kkt, "kkt_residual": kkt, "smooth_grad_norm": float(g.norm()),
                       "objective": hinge_objective(rows, xs, ys, weight_decay=lam)}
    if kind.convex:
        msgs: list[str] = []
        res = train_convex(obj, x, y, weight_decay=lam, log=msgs.append, config=config.train)
        return res.theta, {"trained": True, "grad_norm": res.grad_norm, "objective": res.objective,
                           "iterations": res.iterations, "log": msgs}
    tc = config.train
    with tqdm(total=tc.epochs, desc="train", unit="epoch", disable=not progress, file=sys.stderr) as bar, \
            tqdm(total=tc.lbfgs_steps if tc.polish_s > 0 else 0, desc="polish (L-BFGS)", unit="it",
                 disable=not progress or tc.polish_s <= 0, file=sys.stderr, leave=True) as polish:
        res = train_network(obj, x, y, weight_decay=lam, config=tc, seed=config.seed,
                            epoch_bar=bar.update, polish_bar=polish.update)
    return res.theta, {"trained": True, "grad_norm": res.grad_norm, "objective": res.objective,
                       "iterations": res.iterations,
                       "stopping": f"{tc.epochs} epochs of {tc.optimizer}, then L-BFGS until "
                                   f"{tc.lbfgs_steps} iterations, its tolerance or {tc.polish_s:g} s"}


def _runs(rows: np.ndarray, size: int) -> list[slice]:
    """Sorted row indices → contiguous slices of at most ``size`` rows."""
    out: list[slice] = []
    if rows.size == 0:
        return out
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for part in np.split(rows, breaks):
        for s in range(0, len(part), size):
            out.append(slice(int(part[s]), int(part[min(s + size, len(part)) - 1]) + 1))
    return out


def _build_into(folder: Path, config: BuildConfig, *, progress: bool, comm: Comm
                ) -> tuple[dict[str, Any], Dataset]:
    """The run's ``run.json`` content (empty on ranks other than 0) and the loaded data."""
    state: dict[str, Any] = load_json(folder / STATE_FILE) if comm.is_root else {}
    timings: dict[str, float] = dict(state.get("timings", {}))

    def record(key: str, value: Any, **times: float) -> None:  # rank 0: one stage is finished
        if comm.is_root:
            state[key] = value
            timings.update(times)
            state["timings"] = timings
            save_json(folder / STATE_FILE, state)

    t0 = time.perf_counter()
    kind = model_kind(config.model)
    dev = comm.device(resolve_device(config.device))
    dtype = build_dtype(config, dev)
    ds = load_data(config.data, seed=config.seed, train_size=config.train_size,
                   test_size=config.test_size)
    data_fp = fingerprint(ds)
    timings.setdefault("load_data_s", time.perf_counter() - t0)
    module = make_module(config, input_shape=ds.input_shape, n_classes=ds.n_classes)
    obj = make_objective(module, config, device=dev, dtype=dtype)
    n = ds.n_train
    mine = shard_rows(n, comm.rank, comm.world)  # this process's training rows
    x_all = np.asarray(ds.x_train)
    y_all = np.asarray(ds.y_train)
    x = torch.from_numpy(np.array(x_all[mine])).to(dev, dtype)
    y = torch.from_numpy(np.array(y_all[mine])).to(dev)

    # ---- θ̂: trained on rank 0 (or taken from the interrupted build), broadcast to every rank
    t = time.perf_counter()
    theta = torch.zeros(obj.n_params, dtype=dtype, device=dev)
    if comm.is_root:
        if "training" in state and (folder / THETA_FILE).is_file():
            theta = load_tensors(folder / THETA_FILE)["theta"].to(dev, dtype)
        else:
            x_full = x if comm.world == 1 else torch.from_numpy(np.array(x_all)).to(dev, dtype)
            y_full = y if comm.world == 1 else torch.from_numpy(np.array(y_all)).to(dev)
            theta, train_info = _train(config, kind, obj, ds, x_full, y_full, dev=dev, dtype=dtype,
                                       progress=progress)
            obj.load_flat(theta)
            with torch.no_grad():
                train_info["train_accuracy"] = _accuracy(obj.logits(theta, x_full), y_full)
                x_test = torch.from_numpy(np.array(ds.x_test)).to(dev, dtype)
                y_test = torch.from_numpy(np.array(ds.y_test)).to(dev)
                train_info["test_accuracy"] = _accuracy(obj.logits(theta, x_test), y_test)
            train_info["convex"] = kind.convex
            save_tensors(folder / THETA_FILE, {"theta": theta})
            if kind is ModelKind.USER and ":" not in config.model:
                shutil.copyfile(config.model, folder / SCRIPT_FILE)
            record("training", train_info, train_s=time.perf_counter() - t)
            logger.info("trained %s (%d parameters) in %.1f s: |grad R| %.2e, test accuracy %.3f",
                        kind.value, obj.n_params, time.perf_counter() - t, train_info["grad_norm"],
                        train_info["test_accuracy"])
    theta = comm.broadcast(theta.contiguous())
    obj.load_flat(theta)
    model_fp = model_fingerprint(obj, theta)

    # ---- per-sample gradients → store: each rank its own rows, only those not yet done
    t = time.perf_counter()
    projector = (Projector(obj.n_params, config.project, seed=config.seed, dtype=dtype, device=dev)
                 if config.project else None)
    dim = config.project or obj.n_params
    store_dtype = _store_dtype(config, dtype)
    extra = {"data_fingerprint": data_fp, "model_fingerprint": model_fp,
             "projection": {"k": config.project, "seed": config.seed} if config.project else None}
    store_done = (folder / GRADS_FILE).is_file()  # renamed only once every row was in
    if not store_done:
        writer = StoreWriter(folder, n=n, dim=dim, dtype=store_dtype, resume=True) if comm.is_root else None
        comm.barrier()  # rank 0 has created (or reopened) the files
        if writer is None:
            writer = StoreWriter(folder, n=n, dim=dim, dtype=store_dtype, create=False)
        todo = writer.missing(mine)
        with tqdm(total=mine.stop - mine.start, initial=mine.stop - mine.start - len(todo),
                  desc="gradients", unit="img", disable=not progress, file=sys.stderr) as bar:
            for rows in _runs(todo, config.chunk_size):
                local = slice(rows.start - mine.start, rows.stop - mine.start)

                def sink(part: slice, block: torch.Tensor, base: int = rows.start) -> None:
                    writer.write(slice(base + part.start, base + part.stop), block)

                per_sample_grads(obj, theta, x[local], y[local], chunk_size=config.chunk_size,
                                 projector=projector, sink=sink, progress=bar.update)
        comm.barrier()  # every rank's rows are in
        if comm.is_root:
            writer.finish(extra)
        else:
            writer.close()
    elif comm.is_root and not (folder / MANIFEST_FILE).is_file():
        # killed between the rename and the manifest: the rows are complete, write the manifest
        StoreWriter.write_manifest(folder, n=n, dim=dim, dtype=store_dtype, extra=extra)
    manifest = load_json(folder / MANIFEST_FILE) if comm.is_root else {}
    if "store" not in state:
        record("store", manifest, gradients_s=time.perf_counter() - t)
        logger.info("stored %d gradients of dimension %d (%s) in %.1f s", n, dim, store_dtype,
                    time.perf_counter() - t)

    # ---- curvature: every rank applies its shard's Hessian, summed over ranks
    t = time.perf_counter()
    shift = config.weight_decay + config.damping
    curvature: dict[str, Any] = dict(state.get("curvature", {}))
    done = bool(comm.broadcast(torch.tensor([float("curvature" in state)], dtype=torch.float64)).item())
    if not done:
        weight = (mine.stop - mine.start) / n  # this rank's share of the mean
        local = full_hvp(obj, theta, x, y, shift=0.0)
        hvp = reduced_hvp(local, weight=weight, shift=shift, comm=comm)
        curvature = {"method": config.ihvp.value, "shift": shift}
        if config.ihvp is IHVPMethod.EXACT:
            with tqdm(total=obj.n_params, desc="hessian", unit="col", disable=not progress,
                      file=sys.stderr) as bar:
                h = reduced_hessian(data_hessian(obj, theta, x, y, progress=bar.update),
                                    weight=weight, shift=shift, comm=comm)
            if comm.is_root:
                save_tensors(folder / CURVATURE_FILE, {"hessian": h})
        elif config.ihvp is IHVPMethod.PROJECTED:
            assert projector is not None
            c = projected_curvature(hvp, projector)
            if comm.is_root:
                save_tensors(folder / CURVATURE_FILE, {"projected": c})
        elif config.ihvp is IHVPMethod.LISSA and config.lissa.scale is None:
            curvature["lissa_scale"] = lissa_scale(hvp, n_params=obj.n_params, config=config,
                                                   dtype=dtype, device=dev)
        record("curvature", curvature, curvature_s=time.perf_counter() - t)
        logger.info("curvature (%s) in %.1f s", config.ihvp.value, time.perf_counter() - t)
    timings["total_s"] = sum(v for k, v in timings.items() if k != "total_s")
    if not comm.is_root:
        return {}, ds

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
        "training": state["training"],
        "store": manifest,
        "curvature": curvature,
        "timings": timings,
        "device": str(dev),
        "processes": comm.world,
        "versions": {"engine": ENGINE_VERSION, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, ds
