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
import dataclasses
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

from .config import AUTO_IHVP, BuildConfig, IHVPMethod, ModelKind
from .data import BUILTIN_DATA, IDX_PREFIX, Dataset, fingerprint, load_data
from .distributed import Comm, LocalComm, reduced_hessian, reduced_hvp, shard_rows
from .ensemble import check_ensemble, member_folder, member_seed, record_ensemble
from .errors import InfluenceError, RunError
from .grads.layers import select_modules
from .grads.pca import PCA_SAMPLES
from .grads.space import CALIBRATION_SAMPLES, make_space
from .ihvp import data_hessian, full_hvp, projected_curvature
from .ihvp.hessian import linear_layer
from .models import (
    build_dtype,
    load_buffers,
    make_module,
    make_objective,
    model_buffers,
    model_fingerprint,
    model_kind,
    resolve_device,
)
from .plan import check_config, check_method, plan_build
from .run import Run
from .runinfo import CURVATURE_FILE, RUN_FILE, RUN_SCHEMA, SCRIPT_FILE, THETA_FILE, RunInfo
from .solvers import lissa_scale, parse_method
from .stages import accuracy, ekfac_factors, train_theta
from .store.files import load_json, load_tensors, save_json, save_tensors
from .store.gradients import DONE_FILE, MANIFEST_FILE
from .store.resident import ResidentStore
from .store_stage import MappedRows, kronecker_bases, user_grad_norm, write_store

__all__ = ["ENGINE_VERSION", "STATE_FILE", "build", "partial_folder"]

logger = logging.getLogger(__name__)

ENGINE_VERSION = "0.1.0"
STATE_FILE = "build-state.json"  # in the partial folder only: settings and finished stages
RESUME_IGNORES = ("chunk_size",)  # settings a resumed build may change (results do not depend on them)


def partial_folder(out: Path) -> Path:
    """The folder a build of ``out`` writes into before renaming it to ``out``."""
    return out.parent / f".{out.name}.partial"


def _data_spec(data: str) -> str:
    """A data spec with its path made absolute (built-in names stay as they are)."""
    if data in BUILTIN_DATA:
        return data
    if data.startswith(IDX_PREFIX):
        return IDX_PREFIX + str(Path(data[len(IDX_PREFIX):]).resolve())
    return str(Path(data).resolve())


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
    ``damping``, ``ihvp``, ``project``, ``projection``, ``params``, ``device``, ``seed``,
    ``train_size``, ``test_size``, ``label_noise``, ``dtype``, ``store_dtype``, ``weights``, ``svm_temperature``,
    ``chunk_size``, ``train``, ``cg``, ``lissa``); what is not given takes the config's default,
    except ``ihvp``, which defaults to ``auto`` (:func:`engine.plan.auto_method`: a method that
    finishes in minutes for the model's size). Refuses an existing ``out`` unless ``force``. ``resume`` continues a killed
    build of the same settings from its partial folder. ``comm`` (see :mod:`engine.distributed`)
    spreads the work over processes; then only rank 0 returns the run (the others return None).
    """
    comm = comm or LocalComm()
    requested = options.pop("ihvp", AUTO_IHVP)
    requested = requested.value if isinstance(requested, IHVPMethod) else str(requested)
    # `auto` is resolved once the model's size is known (engine.plan); until then a placeholder
    options["ihvp"] = IHVPMethod.EXACT if requested == AUTO_IHVP else parse_method(requested)
    data_spec = _data_spec(data)
    model_spec = model
    if model_kind(model) is ModelKind.USER and Path(model).is_file():
        model_spec = str(Path(model).resolve())
    try:
        config = BuildConfig(data=data_spec, model=model_spec, **options)
    except TypeError as exc:
        raise InfluenceError(f"unknown build option: {exc}") from exc
    check_config(config, requested)
    check_ensemble(config, model_kind(config.model))
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
        info, ds, resident = _build_into(tmp, config, requested=requested, progress=progress and comm.is_root,
                               comm=comm)
        if config.ensemble > 1:
            members = _build_members(tmp, config, requested=requested, progress=progress, comm=comm)
            if comm.is_root:
                record_ensemble(info, members, config)
        if comm.is_root:
            _finish(tmp, info)
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
    # the data as loaded and the rows as written, neither read again
    return Run(out, RunInfo.from_dict(load_json(out / RUN_FILE), where=out / RUN_FILE), dataset=ds,
               resident=resident)


def _finish(folder: Path, info: dict[str, Any]) -> None:
    """Drop the build's bookkeeping and write ``run.json`` (last: the folder is now a run)."""
    for leftover in (STATE_FILE, DONE_FILE):
        (folder / leftover).unlink(missing_ok=True)
    save_json(folder / RUN_FILE, info)


def _build_members(tmp: Path, config: BuildConfig, *, requested: str, progress: bool, comm: Comm
                   ) -> list[dict[str, Any]]:
    """Members 1..N−1 of an ensemble, each a complete run in ``tmp/members/<j>`` trained with
    seed S + j (:mod:`engine.ensemble`); a member with its ``run.json`` is done, one with only
    its state is continued. Returns the members' ``run.json`` contents (rank 0; {} elsewhere)."""
    member_config = dataclasses.replace(config, ensemble=1)
    out = []
    for j in range(1, config.ensemble):
        folder = member_folder(tmp, j)
        if (folder / RUN_FILE).is_file():  # finished before the build was interrupted
            out.append(load_json(folder / RUN_FILE) if comm.is_root else {})
            continue
        if comm.is_root and progress:
            print(f"ensemble member {j + 1}/{config.ensemble} (seed {member_seed(config.seed, j)})", file=sys.stderr)
        if comm.is_root and not _resume_state(folder, member_config, True):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            save_json(folder / STATE_FILE, {"config": member_config.to_dict()})
        comm.barrier()
        info, _, _ = _build_into(folder, member_config, requested=requested,
                              progress=progress and comm.is_root, comm=comm, member=j)
        if comm.is_root:
            _finish(folder, info)
        out.append(info)
    return out


def _every_rank(flag: bool, comm: Comm) -> bool:
    """True on every rank when ``flag`` is true on every rank."""
    total = comm.all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64))
    return int(total.item()) == comm.world


def _store_dtype(config: BuildConfig, dtype: torch.dtype) -> str:
    if config.store_dtype != "auto":
        return config.store_dtype
    return {torch.float64: "float64", torch.float32: "float32"}[dtype]


def _build_into(folder: Path, config: BuildConfig, *, requested: str, progress: bool, comm: Comm,
                member: int = 0) -> tuple[dict[str, Any], Dataset, ResidentStore | None]:
    """The run's ``run.json`` content (empty on ranks other than 0), the loaded data and, when
    the store pass kept them, the store's rows in memory.
    ``member`` j > 0: ensemble member j, whose model is initialised and trained with seed S + j
    (the data, projection and solvers keep S)."""
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
                   test_size=config.test_size, label_noise=config.label_noise)
    data_fp = fingerprint(ds)
    timings.setdefault("load_data_s", time.perf_counter() - t0)
    seeded = dataclasses.replace(config, seed=member_seed(config.seed, member))  # init and batch order
    module = make_module(seeded, input_shape=ds.input_shape, n_classes=ds.n_classes)
    tracked = select_modules(module, config.params).param_names if config.params else None
    n = ds.n_train
    obj_all = make_objective(module, config, device=dev, dtype=dtype)  # every trainable parameter
    mine = shard_rows(n, comm.rank, comm.world)  # this process's training rows
    x_all = np.asarray(ds.x_train)
    y_all = np.asarray(ds.y_train)
    x = torch.from_numpy(np.array(x_all[mine])).to(dev, dtype)
    y = torch.from_numpy(np.array(y_all[mine])).to(dev)

    # ---- the plan: `auto` resolved, every stage's memory and time estimated before it starts
    plan = plan_build(config, obj_all, x, y, kind=kind, n_test=ds.n_test,
                      linear=linear_layer(obj_all) is not None, ihvp_requested=requested)
    config = dataclasses.replace(config, ihvp=plan.ihvp)
    check_method(config)
    if comm.is_root and progress and member == 0:
        print("\n".join(plan.lines()), file=sys.stderr)
        if config.ensemble > 1:
            print(f"ensemble of {config.ensemble} models: about {config.ensemble}x the time and "
                  "disk above", file=sys.stderr)
    plan.check()

    # a user model whose store holds every parameter unprojected: ‖∇R‖ from the store's rows
    full_user = kind is ModelKind.USER and comm.world == 1 and not config.project and not config.params
    # ---- θ̂: trained on rank 0 (or taken from the interrupted build), broadcast to every rank
    t = time.perf_counter()
    theta_all = torch.zeros(obj_all.n_params, dtype=dtype, device=dev)
    if comm.is_root:
        if "training" in state and (folder / THETA_FILE).is_file():
            theta_all = load_tensors(folder / THETA_FILE)["all"].to(dev, dtype)
        else:
            x_full = x if comm.world == 1 else torch.from_numpy(np.array(x_all)).to(dev, dtype)
            y_full = y if comm.world == 1 else torch.from_numpy(np.array(y_all)).to(dev)
            theta_all, train_info = train_theta(seeded, kind, obj_all, ds, x_full, y_full, dev=dev,
                                                dtype=dtype, progress=progress, user_grad_norm=not full_user)
            obj_all.load_flat(theta_all)
            train_info["train_accuracy"] = accuracy(obj_all, theta_all, x_full, y_full)
            x_test = torch.from_numpy(np.array(ds.x_test)).to(dev, dtype)
            y_test = torch.from_numpy(np.array(ds.y_test)).to(dev)
            train_info["test_accuracy"] = accuracy(obj_all, theta_all, x_test, y_test)
            train_info["convex"] = kind.convex
            obj = make_objective(module, config, device=dev, dtype=dtype, tracked=tracked)
            save_tensors(folder / THETA_FILE, {"theta": obj.flat_params(), "all": theta_all,
                                               **model_buffers(module)})
            if kind is ModelKind.USER and ":" not in config.model:
                shutil.copyfile(config.model, folder / SCRIPT_FILE)
            record("training", train_info, train_s=time.perf_counter() - t)
            logger.info("trained %s (%d parameters) in %.1f s: test accuracy %.3f", kind.value,
                        obj_all.n_params, time.perf_counter() - t, train_info["test_accuracy"])
    theta_all = comm.broadcast(theta_all.contiguous())
    obj_all.load_flat(theta_all)
    comm.barrier()  # model.pt is written: every rank takes rank 0's buffers (BatchNorm statistics)
    load_buffers(module, load_tensors(folder / THETA_FILE))
    obj = make_objective(module, config, device=dev, dtype=dtype, tracked=tracked)  # θ: the tracked ones
    theta = obj.flat_params()
    model_fp = model_fingerprint(obj, theta)

    # ---- per-sample gradients → store: each rank its own rows, only those not yet done; the
    # pass also gathers EK-FAC's covariances and a user model's ∇R when it writes every row
    t = time.perf_counter()
    calibration = torch.from_numpy(np.array(x_all[:CALIBRATION_SAMPLES])), torch.from_numpy(
        np.array(y_all[:CALIBRATION_SAMPLES]))  # the same on every rank: the same split of K
    space = make_space(obj, theta, projection=config.projection, k=config.project, seed=config.seed,
                       params=config.params, x=calibration[0], y=calibration[1])
    if config.kronecker_basis == "pca":
        kronecker_bases(folder, space, torch.from_numpy(np.array(x_all[:PCA_SAMPLES])),
                        torch.from_numpy(np.array(y_all[:PCA_SAMPLES])), comm=comm, threads=config.train.threads,
                        progress=progress)
    store_dtype = _store_dtype(config, dtype)
    extra = {"data_fingerprint": data_fp, "model_fingerprint": model_fp, "projection": space.describe()}
    gather = write_store(folder, space, x, y, mine=mine, n=n, store_dtype=store_dtype, chunk=config.chunk_size,
                         threads=config.train.threads, comm=comm, progress=progress, extra=extra,
                         covariances=config.ihvp is IHVPMethod.EKFAC, row_sum=full_user,
                         resident=member == 0 and config.ensemble == 1)
    # the rows in memory, handed to the run (in a distributed build, a rank's own rows: for EK-FAC)
    resident = gather.resident if gather is not None and comm.world == 1 else None
    manifest = load_json(folder / MANIFEST_FILE) if comm.is_root else {}
    if "store" not in state:
        record("store", manifest, gradients_s=time.perf_counter() - t)
        logger.info("stored %d gradients of dimension %d (%s) in %.1f s", n, space.dim, store_dtype,
                    time.perf_counter() - t)
    if comm.is_root and state["training"]["grad_norm"] is None:  # a user model's, from the store pass
        norm, how = user_grad_norm(obj_all, theta_all, gather, full=full_user, n=n,
                                   weight_decay=config.weight_decay, x=x, y=y, batch=config.train.batch_size)
        record("training", {**state["training"], "grad_norm": norm, "grad_norm_from": how})

    # ---- curvature: every rank applies its shard's Hessian, summed over ranks
    t = time.perf_counter()
    shift = config.weight_decay + config.damping
    curvature: dict[str, Any] = dict(state.get("curvature", {}))
    done = bool(comm.broadcast(torch.tensor([float("curvature" in state)], dtype=torch.float64)).item())
    if not done:
        weight = (mine.stop - mine.start) / n  # this rank's share of the mean
        curvature = {"method": config.ihvp.value, "shift": shift}
        if config.ihvp is IHVPMethod.EXACT:
            with tqdm(total=obj.n_params, desc="hessian", unit="col", disable=not progress,
                      file=sys.stderr) as bar:
                h = reduced_hessian(data_hessian(obj, theta, x, y, progress=bar.update),
                                    weight=weight, shift=shift, comm=comm)
            if comm.is_root:
                save_tensors(folder / CURVATURE_FILE, {"hessian": h})
        elif config.ihvp is IHVPMethod.PROJECTED:
            assert space.projector is not None
            hvp = reduced_hvp(full_hvp(obj, theta, x, y, shift=0.0), weight=weight, shift=shift, comm=comm)
            c = projected_curvature(hvp, space.projector)
            if comm.is_root:
                save_tensors(folder / CURVATURE_FILE, {"projected": c})
        elif config.ihvp is IHVPMethod.LISSA and config.lissa.scale is None:
            hvp = reduced_hvp(full_hvp(obj, theta, x, y, shift=0.0), weight=weight, shift=shift, comm=comm)
            curvature["lissa_scale"] = lissa_scale(hvp, n_params=obj.n_params, config=config,
                                                   dtype=dtype, device=dev)
        elif config.ihvp is IHVPMethod.EKFAC:
            gathered = gather is not None and gather.covariances is not None
            if comm.world > 1 and _every_rank(gathered, comm):
                # each rank's covariances from its store pass and Λ from its own rows (kept in
                # memory by that pass: no rank reads the file another rank finished), summed
                factors = ekfac_factors(space, x, y, gather.resident, progress=progress, covariances=gather.covariances,
                                        captured=gather.captured, comm=comm)
                if comm.is_root:
                    save_tensors(folder / CURVATURE_FILE, factors)
            elif comm.is_root:  # one process, or a resumed distributed build: all the data on rank 0
                rows = resident or MappedRows(folder, expect={"data_fingerprint": data_fp,
                                                              "model_fingerprint": model_fp},
                                              compute_dtype=dtype, device=dev)
                x_full = torch.from_numpy(np.array(x_all)).to(dev, dtype)
                whole = gathered and comm.world == 1  # else rank 0's pass saw its own rows only
                save_tensors(folder / CURVATURE_FILE, ekfac_factors(
                    space, x_full, torch.from_numpy(np.array(y_all)), rows, progress=progress,
                    covariances=gather.covariances if whole else None,
                    captured=gather.captured if whole else None))
        record("curvature", curvature, curvature_s=time.perf_counter() - t)
        logger.info("curvature (%s) in %.1f s", config.ihvp.value, time.perf_counter() - t)
    comm.barrier()
    timings["total_s"] = sum(v for k, v in timings.items() if k != "total_s")
    if not comm.is_root:
        return {}, ds, None

    return {
        "schema_version": RUN_SCHEMA,
        "config": config.to_dict(),
        "data": {"source": config.data, "fingerprint": data_fp, "n_train": ds.n_train,
                 "n_test": ds.n_test, "input_shape": list(ds.input_shape),
                 "n_classes": ds.n_classes, "class_names": list(ds.class_names),
                 "label_noise": config.label_noise, "n_flipped": int(ds.flipped.size)},
        "model": {"kind": kind.value, "spec": config.model, "n_params": obj.n_params,
                  "n_params_all": obj_all.n_params,
                  "dtype": str(dtype).replace("torch.", ""), "fingerprint": model_fp,
                  "tracked": {"patterns": config.params, "n_params": obj.n_params},
                  "parameters": [{"name": n, "shape": list(s)}
                                 for n, s in zip(obj.names, obj.shapes)]},
        "objective": {"weight_decay": config.weight_decay, "damping": config.damping,
                      "loss": "smooth_hinge" if kind is ModelKind.SVM else "cross_entropy",
                      "svm_temperature": config.svm_temperature if kind is ModelKind.SVM else None},
        "training": state["training"],
        "store": manifest,
        "curvature": curvature,
        "plan": plan.to_dict(),
        "timings": timings,
        "device": str(dev),
        "processes": comm.world,
        "versions": {"engine": ENGINE_VERSION, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"ensemble": {"member": member, "train_seed": seeded.seed}} if member else {}),
    }, ds, resident
