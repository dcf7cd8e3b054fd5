"""A run: one folder with everything a query needs, opened as a small facade over named parts.

- ``run.info`` (:class:`~engine.runinfo.RunInfo`): ``run.json``, typed;
- ``run.model`` (θ̂ and the objective), ``run.data`` (the splits as tensors), ``run.store`` (the
  gradient store and its projection): :mod:`engine.parts`;
- ``run.solvers`` (:class:`~engine.solvers.SolverBank`): one solver per (IHVP method, damping);
- ``run.queries`` (:class:`~engine.query.scoring.Scorer`): scores, self-influence, top-k;
- ``run.cache`` (:class:`~engine.cache.BoundedCache`): every cache a query fills, within a budget.

Scores follow the contract: ``I_up,loss(z_i, z_test) = −∇L(z_test)ᵀ H⁻¹ ∇L(z_i)``; positive is
harmful, negative helpful; removing z_i changes the test loss by about ``−I/n``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import DEFAULT_BUDGET_BYTES, BoundedCache
from .config import BuildConfig, IHVPMethod
from .data import Dataset
from .errors import QueryError
from .ihvp import Solver
from .parts import load_parts
from .query.scoring import Scorer, check_indices
from .runinfo import RunInfo, read_run_info
from .solvers import SolverBank

__all__ = ["Run", "open_run"]


class Run:
    """An opened run. Use :func:`open_run` or :func:`engine.build` to get one."""

    def __init__(self, path: Path, info: RunInfo, *, device: str | None = None,
                 dataset: Dataset | None = None, cache_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        """``dataset``: the run's data when the caller already holds it (the build); its
        fingerprint is checked like that of data loaded here. ``cache_bytes``: the budget of
        :attr:`cache`."""
        self.path = Path(path)
        self.info = info
        self.config: BuildConfig = info.config
        self.model, self.data, self.store, curvature = load_parts(self.path, info, device=device,
                                                                  dataset=dataset)
        self.cache = BoundedCache(cache_bytes)
        self.solvers = SolverBank(info, self.model, self.data, self.store, curvature)
        self.queries = Scorer(self.model, self.data, self.store, self.solvers, self.cache)

    # ------------------------------------------------------------------ basics
    @property
    def dataset(self) -> Dataset:
        return self.data.dataset

    @property
    def n_train(self) -> int:
        return self.dataset.n_train

    @property
    def n_test(self) -> int:
        return self.dataset.n_test

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def default_method(self) -> IHVPMethod:
        return self.config.ihvp

    def solver(self, method: str | IHVPMethod | None = None, *, damping: float | None = None) -> Solver:
        """The solver for ``method`` (default: the run's) and ``H + damping·I`` (default: δ)."""
        return self.solvers.get(method, damping=damping)

    def ihvp_report(self, method: str | IHVPMethod | None = None,
                    diagnostics: dict[str, Any] | None = None) -> dict[str, Any]:
        """``{"method", "settings", "diagnostics"}``: a solver and one of its solves."""
        return self.solvers.report(method, diagnostics)

    def predict_proba(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Class probabilities (b, C) for inputs in the data set's layout (b, *input_shape)."""
        return self.model.predict_proba(x)

    # ------------------------------------------------------------------ cached per-point figures
    def predictions(self, split: str = "test") -> np.ndarray:
        """Class probabilities of every point of ``split`` ("train" or "test"), float64 (n, C)."""
        if split not in ("train", "test"):
            raise QueryError(f"unknown split {split!r}: use train or test")
        x = self.data.x_train if split == "train" else self.data.x_test
        return self.cache.get(("proba", split), lambda: self.predict_proba(x).astype(np.float64))

    def train_losses(self) -> np.ndarray:
        """Data loss L(z_i, θ̂) of every training point, float64 (n_train,): the simplest
        mislabel baseline to show beside self-influence."""
        return self.cache.get(("train-loss",), lambda: self.model.sample_losses(
            self.data.x_train, self.data.y_train).cpu().double().numpy())

    def gradient_norms(self) -> np.ndarray:
        """‖∇L(z_i, θ̂)‖ of every training point (in the store's space), float64 (n_train,)."""
        return self.cache.get(("grad-norm",), lambda: self.store.resident.row_norms().cpu().numpy())

    # ------------------------------------------------------------------ the contract's queries
    def scores(self, test_index: int | Sequence[int] | np.ndarray | None = None,
               ihvp: str | IHVPMethod | None = None, *, damping: float | None = None) -> np.ndarray:
        """``I_up,loss`` as float64 (n_train, n_test_selected), columns in the given order
        (``damping``: score with ``H + damping·I`` instead of the run's δ)."""
        g = self.queries.test_gradients(check_indices(test_index, self.n_test, "test"))
        return self.queries.scores_for_gradients(g, ihvp, damping=damping).cpu().double().numpy()

    def self_influence(self, ihvp: str | IHVPMethod | None = None) -> np.ndarray:
        """``I_up,loss(z_i, z_i)`` for every training point, float64 (n_train,), cached."""
        return self.queries.self_influence(ihvp)

    def train_influence(self, train_index: int, ihvp: str | IHVPMethod | None = None) -> np.ndarray:
        """``I_up,loss(z_i, z_test)`` of one training point on every test point (n_test,)."""
        return self.queries.train_influence(train_index, ihvp)

    def params(self, train_index: int, ihvp: str | IHVPMethod | None = None) -> np.ndarray:
        """``I_up,params(z_i) = −H⁻¹ ∇L(z_i)``, float64 (p,) in ``named_parameters()`` order."""
        return self.queries.params(train_index, ihvp)

    def explain(self, test_index: int, top: int = 10, ihvp: str | IHVPMethod | None = None
                ) -> dict[str, Any]:
        """The most helpful and harmful training points for one test point (REST influence shape)."""
        i = int(check_indices(test_index, self.n_test, "test")[0])
        found = self.queries.top_influences(self.queries.test_gradients([i]), top=top, ihvp=ihvp)
        proba = self.predict_proba(self.data.x_test[i : i + 1])[0]
        return {"test_id": i, "label": int(self.dataset.y_test[i]), "predicted": int(proba.argmax()),
                "probabilities": [float(p) for p in proba], **found.lists(0, self.dataset.y_train),
                "ihvp": self.ihvp_report(ihvp, found.diagnostics)}

    def explain_input(self, x: np.ndarray, *, label: int | None = None, top: int = 10,
                      ihvp: str | IHVPMethod | None = None) -> dict[str, Any]:
        """:meth:`explain` for a new input ``x`` shaped like one data point (``input_shape``).

        The test loss is taken at ``label``, or at the predicted class when no label is given
        (then the lists explain the prediction itself)."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.shape != tuple(self.dataset.input_shape):
            raise QueryError(f"input shape {arr.shape} is not the run's {tuple(self.dataset.input_shape)}")
        if label is not None and not 0 <= label < self.dataset.n_classes:
            raise QueryError(f"label {label} is out of range 0..{self.dataset.n_classes - 1}")
        xt = torch.from_numpy(arr[None]).to(self.device, self.model.dtype)
        proba = self.predict_proba(xt)[0]
        predicted = int(proba.argmax())
        target = predicted if label is None else int(label)
        g = self.queries.input_gradients(xt, torch.tensor([target]))
        found = self.queries.top_influences(g, top=top, ihvp=ihvp)
        return {"label": label, "explained_class": target, "predicted": predicted,
                "probabilities": [float(p) for p in proba], **found.lists(0, self.dataset.y_train),
                "ihvp": self.ihvp_report(ihvp, found.diagnostics)}


def open_run(path: str | Path, *, device: str | None = None,
             cache_bytes: int = DEFAULT_BUDGET_BYTES) -> Run:
    """Open a run folder built by :func:`engine.build`; refuses stale or incomplete runs.
    ``cache_bytes``: the budget of the run's query caches (:mod:`engine.cache`)."""
    folder = Path(path)
    return Run(folder, read_run_info(folder), device=device, cache_bytes=cache_bytes)
