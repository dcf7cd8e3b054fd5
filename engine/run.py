"""A run: one folder with everything a query needs, opened as a small facade over named parts.

- ``run.info`` (:class:`~engine.runinfo.RunInfo`): ``run.json``, typed;
- ``run.model`` (θ̂ and the objective), ``run.data`` (the splits as tensors), ``run.store`` (the
  gradient store and its projection): :mod:`engine.parts`;
- ``run.solvers`` (:class:`~engine.solvers.SolverBank`): one solver per (IHVP method, damping);
- ``run.queries`` (:class:`~engine.query.scoring.Scorer`): scores, self-influence, top-k;
- ``run.cache`` (:class:`~engine.cache.BoundedCache`): every cache a query fills, within a budget;
- ``run.ensemble`` (:class:`~engine.ensemble.Ensemble`, None for one model): the members of a run
  built with ``ensemble=N``; then ``scores``, ``self_influence``, ``train_influence``, ``explain``
  and ``explain_input`` average the members' scores (and explanations say how consistent each
  listed point is across them). Predictions, losses, gradient norms and ``params`` are the run's
  own model's (member 0).

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
from .ensemble import Ensemble, KeyedCache, averaged_top, member_folder, summary
from .errors import QueryError
from .ihvp import Solver
from .parts import load_parts
from .query.scoring import Scorer, check_indices
from .results import TopInfluences
from .runinfo import RunInfo, read_run_info
from .solvers import SolverBank
from .store.resident import ResidentStore

__all__ = ["Run", "open_run"]


class Run:
    """An opened run. Use :func:`open_run` or :func:`engine.build` to get one."""

    def __init__(self, path: Path, info: RunInfo, *, device: str | None = None,
                 dataset: Dataset | None = None, cache_bytes: int = DEFAULT_BUDGET_BYTES,
                 cache: BoundedCache | KeyedCache | None = None,
                 resident: ResidentStore | None = None) -> None:
        """``dataset``: the run's data when the caller already holds it (the build); its
        fingerprint is checked like that of data loaded here. ``resident``: the store's rows
        already in memory (the build that wrote them), instead of reading the file. ``cache_bytes``: the budget of
        :attr:`cache`; ``cache``: a cache to use instead (an ensemble member shares the run's)."""
        self.path = Path(path)
        self.info = info
        self.config: BuildConfig = info.config
        self.model, self.data, self.store, curvature = load_parts(self.path, info, device=device,
                                                                  dataset=dataset, resident=resident)
        self.cache: BoundedCache | KeyedCache = cache if cache is not None else BoundedCache(cache_bytes)
        self.solvers = SolverBank(info, self.model, self.data, self.store, curvature)
        self.queries = Scorer(self.model, self.data, self.store, self.solvers, self.cache)  # type: ignore[arg-type]
        self.ensemble: Ensemble | None = None
        if self.config.ensemble > 1:
            self.ensemble = Ensemble(self, lambda j: Run(
                member_folder(self.path, j), read_run_info(member_folder(self.path, j)),
                device=device, dataset=self.dataset, cache=KeyedCache(self.cache, ("member", j))))

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
        (``damping``: score with ``H + damping·I`` instead of the run's δ). On an ensemble, the
        mean of the members' own scores."""
        idx = check_indices(test_index, self.n_test, "test")
        if self.ensemble is None:
            return self._own_scores(idx, ihvp, damping)
        if len(idx) == 1:  # one test point: the members' scores a page shows twice are cached
            return self._member_scores(int(idx[0]), ihvp, damping)[0].mean(axis=0)[:, None]
        return self.ensemble.mean(lambda r: r._own_scores(idx, ihvp, damping))

    def _own_scores(self, idx: np.ndarray, ihvp: str | IHVPMethod | None, damping: float | None
                    ) -> np.ndarray:
        g = self.queries.test_gradients(idx)  # (m, d)
        return self.queries.scores_for_gradients(g, ihvp, damping=damping).cpu().double().numpy()

    def _member_scores(self, i: int, ihvp: str | IHVPMethod | None, damping: float | None = None
                       ) -> tuple[np.ndarray, dict[str, Any]]:
        """Every member's own scores of test point i, float64 (N, n_train), and member 0's solve
        diagnostics; kept in the run's cache per (test point, method, damping)."""
        assert self.ensemble is not None
        ensemble = self.ensemble
        method = self.solvers.key(ihvp, damping)

        def compute() -> tuple[np.ndarray, dict[str, Any]]:
            found = [r.queries.scores_report(r.queries.test_gradients([i]), ihvp, damping=damping)
                     for r in ensemble.members()]
            stack = np.stack([s[:, 0].cpu().double().numpy() for s, _ in found])  # (N, n)
            return stack, found[0][1]

        return self.cache.get(("ensemble-scores", i, method[0].value, method[1]), compute)

    def member_scores(self, test_index: int, ihvp: str | IHVPMethod | None = None) -> np.ndarray:
        """Each model's own ``I_up,loss`` of one test point, float64 (N, n_train): row j is
        ensemble member j's (one row for a single model); :meth:`scores` is their mean."""
        i = int(check_indices(test_index, self.n_test, "test")[0])
        if self.ensemble is None:
            return self._own_scores(np.array([i]), ihvp, None).T
        return self._member_scores(i, ihvp)[0]

    def self_influence(self, ihvp: str | IHVPMethod | None = None) -> np.ndarray:
        """``I_up,loss(z_i, z_i)`` for every training point, float64 (n_train,), cached (on an
        ensemble, the mean of the members' own)."""
        ensemble = self.ensemble
        if ensemble is None:
            return self.queries.self_influence(ihvp)
        return self.cache.get(("ensemble-self", self.solvers.get(ihvp).method.value),
                              lambda: ensemble.mean(lambda r: r.queries.self_influence(ihvp)))

    def train_influence(self, train_index: int, ihvp: str | IHVPMethod | None = None) -> np.ndarray:
        """``I_up,loss(z_i, z_test)`` of one training point on every test point (n_test,)
        (on an ensemble, the mean of the members')."""
        if self.ensemble is None:
            return self.queries.train_influence(train_index, ihvp)
        return self.ensemble.mean(lambda r: r.queries.train_influence(train_index, ihvp))

    def params(self, train_index: int, ihvp: str | IHVPMethod | None = None) -> np.ndarray:
        """``I_up,params(z_i) = −H⁻¹ ∇L(z_i)``, float64 (p,) in ``named_parameters()`` order.
        On an ensemble, of the run's own model (member 0): the members' parameters are not
        aligned (another initialisation), so their parameter changes cannot be averaged."""
        return self.queries.params(train_index, ihvp)

    def _top(self, top: int, ihvp: str | IHVPMethod | None, *, test: int | None = None,
             member_gradients: Any = None) -> tuple[TopInfluences, dict[str, Any]]:
        """The top lists of one test point (or input) and the explanation's extra fields."""
        if self.ensemble is None:
            g = self.queries.test_gradients([test]) if test is not None else member_gradients(self)
            return self.queries.top_influences(g, top=top, ihvp=ihvp), {}
        if top < 1:
            raise QueryError(f"top must be at least 1, got {top}")
        if test is not None:
            stack, diagnostics = self._member_scores(test, ihvp)
        else:
            found = [r.queries.scores_report(member_gradients(r), ihvp)
                     for r in self.ensemble.members()]
            stack, diagnostics = np.stack([s[:, 0].cpu().double().numpy() for s, _ in found]), found[0][1]
        best = averaged_top(stack, top, diagnostics=diagnostics)
        return best, {"ensemble": summary(best, members=self.ensemble.size, seeds=self.ensemble.seeds)}

    def explain(self, test_index: int, top: int = 10, ihvp: str | IHVPMethod | None = None
                ) -> dict[str, Any]:
        """The most helpful and harmful training points for one test point (REST influence shape).
        On an ensemble, ranked by the members' mean score; each item has a ``consistency`` and
        the result an ``ensemble`` field (:mod:`engine.ensemble`)."""
        i = int(check_indices(test_index, self.n_test, "test")[0])
        found, extra = self._top(top, ihvp, test=i)
        proba = self.predict_proba(self.data.x_test[i : i + 1])[0]
        return {"test_id": i, "label": int(self.dataset.y_test[i]), "predicted": int(proba.argmax()),
                "probabilities": [float(p) for p in proba], **found.lists(0, self.dataset.y_train),
                "ihvp": self.ihvp_report(ihvp, found.diagnostics), **extra}

    def explain_input(self, x: np.ndarray, *, label: int | None = None, top: int = 10,
                      ihvp: str | IHVPMethod | None = None) -> dict[str, Any]:
        """:meth:`explain` for a new input ``x`` shaped like one data point (``input_shape``).

        The test loss is taken at ``label``, or at the predicted class when no label is given
        (then the lists explain the prediction itself; on an ensemble, member 0's prediction,
        and every member's loss is taken at that class)."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.shape != tuple(self.dataset.input_shape):
            raise QueryError(f"input shape {arr.shape} is not the run's {tuple(self.dataset.input_shape)}")
        if label is not None and not 0 <= label < self.dataset.n_classes:
            raise QueryError(f"label {label} is out of range 0..{self.dataset.n_classes - 1}")
        xt = torch.from_numpy(arr[None]).to(self.device, self.model.dtype)
        proba = self.predict_proba(xt)[0]
        predicted = int(proba.argmax())
        target = predicted if label is None else int(label)

        def gradients(r: Run) -> torch.Tensor:  # (1, d) in member r's store space
            return r.queries.input_gradients(xt.to(r.device, r.model.dtype), torch.tensor([target]))

        found, extra = self._top(top, ihvp, member_gradients=gradients)
        return {"label": label, "explained_class": target, "predicted": predicted,
                "probabilities": [float(p) for p in proba], **found.lists(0, self.dataset.y_train),
                "ihvp": self.ihvp_report(ihvp, found.diagnostics), **extra}


def open_run(path: str | Path, *, device: str | None = None,
             cache_bytes: int = DEFAULT_BUDGET_BYTES) -> Run:
    """Open a run folder built by :func:`engine.build`; refuses stale or incomplete runs.
    ``cache_bytes``: the budget of the run's query caches (:mod:`engine.cache`)."""
    folder = Path(path)
    return Run(folder, read_run_info(folder), device=device, cache_bytes=cache_bytes)
