"""The loaded parts of a run: the model at θ̂, the data as tensors, and the gradient store.

:func:`load_parts` opens each from a run folder and checks it against ``run.json``'s fingerprints
(a changed data set, model or store is refused with a :class:`~engine.errors.StaleRunError`).
The :class:`~engine.run.Run` facade holds one of each; the query modules (scores, FastIF,
groups, validation, attack) read them through these public names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import Dataset, fingerprint, load_data
from .errors import RunError, StaleRunError
from .grads.layers import select_modules
from .grads.pca import BASES_FILE, bases_from_tensors
from .grads.projection import Projector
from .grads.space import GradientSpace, space_from_manifest
from .models import (
    load_buffers,
    make_module,
    make_objective,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
)
from .models.objective import Objective
from .runinfo import CURVATURE_FILE, SCRIPT_FILE, THETA_FILE, RunInfo
from .store.files import load_tensors
from .store.gradients import TORCH_DTYPES, open_store
from .store.resident import ResidentStore

__all__ = ["DataTensors", "GradientStore", "LoadedModel", "load_parts"]

PREDICT_BATCH = 4096


@dataclass(frozen=True)
class LoadedModel:
    """The model at θ̂: ``objective`` (the module as a function of a flat θ) and ``theta`` (p,)."""

    objective: Objective
    theta: torch.Tensor  # (p,)
    device: torch.device
    dtype: torch.dtype

    @property
    def n_params(self) -> int:
        return self.objective.n_params

    def predict_proba(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Class probabilities (b, C) for inputs in the data set's layout (b, *input_shape)."""
        x = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x)
        out = []
        with torch.no_grad():
            for start in range(0, len(x), PREDICT_BATCH):
                xb = x[start : start + PREDICT_BATCH].to(self.device, self.dtype)
                out.append(torch.softmax(self.objective.logits(self.theta, xb), dim=1).cpu())
        return torch.cat(out).numpy()

    def sample_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Data losses L(z, θ̂) (b,) in batches."""
        return torch.cat([self.objective.sample_losses(self.theta, x[s : s + PREDICT_BATCH],
                                                       y[s : s + PREDICT_BATCH])
                          for s in range(0, len(x), PREDICT_BATCH)])


@dataclass(frozen=True)
class DataTensors:
    """The run's data set and its splits as tensors on the run's device."""

    dataset: Dataset
    x_train: torch.Tensor  # (n_train, *input_shape)
    y_train: torch.Tensor  # (n_train,)
    x_test: torch.Tensor  # (n_test, *input_shape)
    y_test: torch.Tensor  # (n_test,)

    @classmethod
    def of(cls, dataset: Dataset, *, device: torch.device, dtype: torch.dtype) -> DataTensors:
        def t(a: Any, floating: bool) -> torch.Tensor:
            out = torch.from_numpy(np.array(a)).to(device)
            return out.to(dtype) if floating else out

        return cls(dataset, t(dataset.x_train, True), t(dataset.y_train, False),
                   t(dataset.x_test, True), t(dataset.y_test, False))


@dataclass(frozen=True)
class GradientStore:
    """The gradient store, resident in its own dtype, and the space it was written in."""

    resident: ResidentStore  # (n_train, d) rows ∇L(z_i, θ̂), or their projections
    space: GradientSpace  # how a row is computed: full (d = p), dense or Kronecker projection (d = K)
    manifest: dict[str, Any]

    @property
    def projector(self) -> Projector | None:
        """The dense projection P (p, K), when the store is densely projected."""
        return self.space.projector

    @property
    def projected(self) -> bool:
        return self.space.projected


def load_parts(path: Path, info: RunInfo, *, device: str | None, dataset: Dataset | None,
               resident: ResidentStore | None = None
               ) -> tuple[LoadedModel, DataTensors, GradientStore, dict[str, torch.Tensor]]:
    """The model, data, store and saved curvature tensors of the run in ``path``, each checked
    against ``info``. ``dataset``: the run's data when the caller already holds it (the build);
    ``resident``: likewise the store's rows (used when on this device, of the file's shape)."""
    config = info.config
    dev = resolve_device(device or config.device)
    dtype = resolve_dtype(info.model.dtype, dev)
    ds = dataset if dataset is not None else load_data(
        config.data, seed=config.seed, train_size=config.train_size, test_size=config.test_size,
        label_noise=config.label_noise)
    if fingerprint(ds) != info.data.fingerprint:
        raise StaleRunError(f"{path}: the data {config.data!r} changed since the run was built "
                            "(fingerprint mismatch); rebuild it with `influence build`")
    script = path / SCRIPT_FILE
    module = make_module(config, input_shape=ds.input_shape, n_classes=ds.n_classes,
                         script_path=script if script.exists() else None)
    saved = load_tensors(path / THETA_FILE)
    load_buffers(module, saved)
    if "all" in saved:  # every trainable parameter: those θ leaves fixed (--params) come from here
        make_objective(module, config, device=dev, dtype=dtype).load_flat(saved["all"].to(dev, dtype))
    tracked = select_modules(module, config.params).param_names if config.params else None
    objective = make_objective(module, config, device=dev, dtype=dtype, tracked=tracked)
    try:
        theta = saved["theta"].to(dev, dtype)
    except KeyError as exc:
        raise RunError(f"{path / THETA_FILE}: cannot read the model parameters ({exc})") from exc
    if theta.shape != (objective.n_params,):
        raise StaleRunError(f"{path}: the model's parameter count changed; rebuild the run")
    objective.load_flat(theta)
    if model_fingerprint(objective, theta) != info.model.fingerprint:
        raise StaleRunError(f"{path}: the model weights changed since the run was built; rebuild it")
    array, manifest = open_store(path, expect={"data_fingerprint": info.data.fingerprint,
                                               "model_fingerprint": info.model.fingerprint})
    # resident copy in the store's own dtype (float16/bfloat16 stay 2 bytes a value)
    if (resident is None or tuple(resident.shape) != tuple(array.shape) or resident.data.device != dev
            or resident.data.dtype != TORCH_DTYPES[manifest["dtype"]] or resident.compute_dtype != dtype):
        resident = ResidentStore.load(array, manifest["dtype"], device=dev, compute_dtype=dtype)  # (n, d)
    projection = manifest.get("projection") or {}
    bases = None
    if projection.get("basis") == "pca":
        bases = bases_from_tensors(load_tensors(path / BASES_FILE))
    space = space_from_manifest(objective, theta, manifest.get("projection"), bases=bases)
    cpath = path / CURVATURE_FILE
    if config.ihvp.needs_curvature_file and not cpath.exists():
        raise RunError(f"{cpath}: missing (the {config.ihvp.value} curvature of this run); "
                       "rebuild the run")
    curvature = load_tensors(cpath) if cpath.exists() else {}
    return (LoadedModel(objective, theta, dev, dtype), DataTensors.of(ds, device=dev, dtype=dtype),
            GradientStore(resident, space, manifest), curvature)
