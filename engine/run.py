"""A run: one folder with everything a query needs, and the queries themselves.

Layout: ``run.json`` (settings, fingerprints, diagnostics; written last, so a folder without it
is not a run), ``model.pt`` (θ̂), ``model.ts`` (a user TorchScript model), ``grads.npy`` +
``manifest.json`` (the gradient store), ``curvature.pt`` (the dense or projected curvature).

Scores follow the contract: ``I_up,loss(z_i, z_test) = −∇L(z_test)ᵀ H⁻¹ ∇L(z_i)``; positive is
harmful, negative helpful; removing z_i changes the test loss by about ``−I/n``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import BuildConfig, IHVPMethod
from .data import Dataset, fingerprint, load_data
from .errors import IndexOutOfRange, QueryError, RunError, StaleRunError
from .grads.per_sample import per_sample_grads
from .grads.projection import Projector
from .ihvp import (
    BlockCG,
    ExactSolver,
    Lissa,
    ProjectedSolver,
    Solver,
    batch_hvp,
    full_hessian,
    full_hvp,
    largest_eigenvalue,
)
from .models import make_module, make_objective, model_fingerprint, resolve_device, resolve_dtype
from .query.topk import helpful_harmful
from .store.files import load_json, load_tensors
from .store.gradients import open_store
from .store.resident import ResidentStore

__all__ = ["Run", "open_run", "RUN_FILE", "THETA_FILE", "SCRIPT_FILE", "CURVATURE_FILE",
           "RUN_SCHEMA", "parse_method"]

RUN_FILE = "run.json"
THETA_FILE = "model.pt"
SCRIPT_FILE = "model.ts"
CURVATURE_FILE = "curvature.pt"
RUN_SCHEMA = 1
PRECONDITIONED_MAX_BYTES = 1 << 30  # an exact run keeps −G H⁻¹ beside a store up to this size


def parse_method(name: str | IHVPMethod | None) -> IHVPMethod | None:
    if name is None or isinstance(name, IHVPMethod):
        return name
    try:
        return IHVPMethod(name)
    except ValueError:
        raise QueryError(
            f"unknown ihvp method {name!r}: use one of {', '.join(m.value for m in IHVPMethod)}"
        ) from None


def _indices(index: int | Sequence[int] | np.ndarray | None, n: int, what: str) -> np.ndarray:
    if index is None:
        return np.arange(n)
    arr = np.atleast_1d(np.asarray(index))
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise QueryError(f"{what} index must be integers, got {index!r}")
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise IndexOutOfRange(f"{what} index {int(bad[0])} is out of range 0..{n - 1}")
    return arr.astype(np.int64)


class Run:
    """An opened run. Use :func:`open_run` or :func:`engine.build` to get one."""

    def __init__(self, path: Path, info: dict[str, Any], *, device: str | None = None,
                 dataset: Dataset | None = None) -> None:
        """``dataset``: the run's data when the caller already holds it (the build); its
        fingerprint is checked like that of data loaded here."""
        self.path = path
        self.info = info
        self.config = BuildConfig.from_dict(info["config"])
        self.device = resolve_device(device or self.config.device)
        self.dtype = resolve_dtype(info["model"]["dtype"], self.device)
        self.dataset: Dataset = (dataset if dataset is not None
                                 else load_data(self.config.data, seed=self.config.seed))
        if fingerprint(self.dataset) != info["data"]["fingerprint"]:
            raise StaleRunError(
                f"{path}: the data {self.config.data!r} changed since the run was built "
                "(fingerprint mismatch); rebuild it with `influence build`"
            )
        script = path / SCRIPT_FILE
        module = make_module(self.config, input_shape=self.dataset.input_shape,
                             n_classes=self.dataset.n_classes,
                             script_path=script if script.exists() else None)
        self.objective = make_objective(module, self.config, device=self.device, dtype=self.dtype)
        try:
            self.theta = load_tensors(path / THETA_FILE)["theta"].to(self.device, self.dtype)
        except KeyError as exc:
            raise RunError(f"{path / THETA_FILE}: cannot read the model parameters ({exc})") from exc
        if self.theta.shape != (self.objective.n_params,):
            raise StaleRunError(f"{path}: the model's parameter count changed; rebuild the run")
        self.objective.load_flat(self.theta)
        if model_fingerprint(self.objective, self.theta) != info["model"]["fingerprint"]:
            raise StaleRunError(f"{path}: the model weights changed since the run was built; rebuild it")
        array, self.manifest = open_store(path, expect={
            "data_fingerprint": info["data"]["fingerprint"],
            "model_fingerprint": info["model"]["fingerprint"],
        })
        # resident copy of the store in its own dtype (float16/bfloat16 stay 2 bytes a value):
        # one pass per query, no disk reads; scores in blocks (see ResidentStore)
        self.resident = ResidentStore.load(array, self.manifest["dtype"], device=self.device,
                                           compute_dtype=self.dtype)  # (n, d)
        proj = self.manifest.get("projection")
        self.projector = (Projector(self.objective.n_params, proj["k"], seed=proj["seed"],
                                    dtype=self.dtype, device=self.device) if proj else None)
        self.x_train = torch.from_numpy(np.array(self.dataset.x_train)).to(self.device, self.dtype)
        self.y_train = torch.from_numpy(np.array(self.dataset.y_train)).to(self.device)
        self.x_test = torch.from_numpy(np.array(self.dataset.x_test)).to(self.device, self.dtype)
        self.y_test = torch.from_numpy(np.array(self.dataset.y_test)).to(self.device)
        cpath = path / CURVATURE_FILE
        if self.config.ihvp in (IHVPMethod.EXACT, IHVPMethod.PROJECTED) and not cpath.exists():
            raise RunError(f"{cpath}: missing (the {self.config.ihvp.value} curvature of this run); "
                           "rebuild the run")
        self._curvature = load_tensors(cpath) if cpath.exists() else {}
        self._solvers: dict[tuple[IHVPMethod, float | None], Solver] = {}
        # queries run on a web server's threads: solvers and caches are built once, under a lock
        self._lock = threading.RLock()
        self._cache: dict[tuple[str, str], np.ndarray] = {}
        self._test_grads: torch.Tensor | None = None
        self._precond: torch.Tensor | None = None  # −G H⁻¹, see preconditioned()
        self._precond_checked = False
        self._exact_columns = 0  # columns the run's own exact solver has scored (see scores_for_gradients)

    # ------------------------------------------------------------------ basics
    @property
    def n_train(self) -> int:
        return self.dataset.n_train

    @property
    def n_test(self) -> int:
        return self.dataset.n_test

    @property
    def default_method(self) -> IHVPMethod:
        return self.config.ihvp

    def predict_proba(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Class probabilities (b, C) for inputs in the data set's layout (b, *input_shape)."""
        x = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x)
        with torch.no_grad():
            logits = self.objective.logits(self.theta, x.to(self.device, self.dtype))
        return torch.softmax(logits, dim=1).cpu().numpy()

    # ------------------------------------------------------------------ solvers
    def solver(self, method: str | IHVPMethod | None = None, *, damping: float | None = None) -> Solver:
        """The (cached) solver for ``method`` (default: the run's own), for ``H + damping·I``
        (default: the run's damping δ; another value is a what-if, e.g. for the trust check)."""
        key = self._solver_key(method, damping)
        if key in self._solvers:
            return self._solvers[key]
        with self._lock:
            if key not in self._solvers:
                self._solvers[key] = self._make_solver(*key)
        return self._solvers[key]

    def _solver_key(self, method: str | IHVPMethod | None, damping: float | None
                    ) -> tuple[IHVPMethod, float | None]:
        """(method, damping) naming a solver: damping None is the run's own δ."""
        m = parse_method(method) or self.default_method
        if damping is not None and (not np.isfinite(damping) or damping < 0):
            raise QueryError(f"damping must be a finite number ≥ 0, got {damping!r}")
        return m, None if damping is None or damping == self.config.damping else float(damping)

    def _make_solver(self, m: IHVPMethod, damping: float | None) -> Solver:
        projected = self.projector is not None
        if projected != (m is IHVPMethod.PROJECTED):
            raise QueryError(
                f"ihvp {m.value!r} cannot be used with this run: its store holds "
                + ("projected gradients (use 'projected')" if projected
                   else "full gradients (build with --project K to use 'projected')")
            )
        if damping is not None and projected:
            raise QueryError("a damping other than the run's needs full gradients; this run is projected")
        shift = self.config.weight_decay + (self.config.damping if damping is None else damping)
        solver: Solver
        if m is IHVPMethod.PROJECTED:
            solver = ProjectedSolver(self._curvature["projected"].to(self.device, self.dtype))
        elif m is IHVPMethod.EXACT:
            h = self._curvature.get("hessian")  # built with the run's own λ + δ
            if h is None:
                h = full_hessian(self.objective, self.theta, self.x_train, self.y_train, shift=shift)
            elif damping is not None:
                h = h + (damping - self.config.damping) * torch.eye(h.shape[0], dtype=h.dtype)
            solver = ExactSolver(h.to(self.device, self.dtype))
        elif m is IHVPMethod.CG:
            solver = BlockCG(full_hvp(self.objective, self.theta, self.x_train, self.y_train,
                                      shift=shift), self.config.cg)
        else:
            cfg = self.config.lissa
            scale = cfg.scale or self.info.get("curvature", {}).get("lissa_scale")
            if scale is None:
                hvp = full_hvp(self.objective, self.theta, self.x_train, self.y_train, shift=shift)
                scale = 1.25 * largest_eigenvalue(hvp, self.objective.n_params, dtype=self.dtype,
                                                  device=self.device, seed=cfg.seed)
            solver = Lissa(batch_hvp(self.objective, self.theta, self.x_train, self.y_train,
                                     shift=shift), n_train=self.n_train, config=cfg, scale=scale,
                           # λ+δ bounds H's spectrum from below only when the data loss is convex
                           min_eigenvalue_bound=shift if self.info["training"].get("convex") else 0.0)
        return solver

    def ihvp_report(self, method: str | IHVPMethod | None = None) -> dict[str, Any]:
        s = self.solver(method)
        return {"method": s.method.value, "settings": s.settings(), "diagnostics": dict(s.diagnostics)}

    # ------------------------------------------------------------------ gradients
    def _to_store_space(self, g: torch.Tensor) -> torch.Tensor:
        return self.projector.project(g) if self.projector is not None else g

    def test_gradients(self, test_index: np.ndarray, *, chunk: int = 512) -> torch.Tensor:
        """(m, d) data-loss gradients of test points, in the store's space."""
        idx = torch.as_tensor(test_index, device=self.device)
        g = per_sample_grads(self.objective, self.theta, self.x_test[idx], self.y_test[idx],
                             chunk_size=chunk, projector=self.projector)
        assert g is not None
        return g

    def input_gradients(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(b, d) gradients for arbitrary inputs (b, *input_shape) with labels y (b,)."""
        g = per_sample_grads(self.objective, self.theta, x.to(self.device, self.dtype),
                             y.to(self.device), projector=self.projector)
        assert g is not None
        return g

    def _score_blocks(self, s: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, −store[block] @ s)`` (b, m) for s (d, m): one product per store block."""
        for start, prod in self.resident.products(s):
            yield start, prod.neg_()  # (b, m)

    # ------------------------------------------------------------------ queries
    def preconditioned(self) -> torch.Tensor | None:
        """``−G H⁻¹`` (n, d) for the run's own exact curvature, or None where it is not kept.

        With it a query for test gradients T (m, d) is one product, ``scores = (−G H⁻¹) Tᵀ``,
        instead of a solve ``H⁻¹Tᵀ`` then a product with the store (same scores to rounding).
        Made once (one Cholesky solve with n right-hand sides) and kept: the store's size again,
        so only for an exact run whose store is in the compute dtype and at most
        ``PRECONDITIONED_MAX_BYTES``; None for every other run (projected, half-precision or
        large stores), which scores block by block from the store.
        """
        if self._precond_checked:
            return self._precond
        with self._lock:
            if not self._precond_checked:
                solver = self.solver(IHVPMethod.EXACT) if self.default_method is IHVPMethod.EXACT else None
                if (isinstance(solver, ExactSolver) and self.projector is None
                        and self.resident.dtype == self.dtype
                        and self.resident.nbytes <= PRECONDITIONED_MAX_BYTES):
                    g = self.resident.data  # (n, d)
                    self._precond = solver.solve(g.T.contiguous()).neg_().T  # (n, d), a view of (d, n)
                self._precond_checked = True
        return self._precond

    def scores_for_gradients(self, g: torch.Tensor, ihvp: str | IHVPMethod | None = None, *,
                             damping: float | None = None) -> torch.Tensor:
        """I_up,loss (n_train, m) for test gradients g (m, d).

        With the run's own exact solver, the first queries solve ``H⁻¹gᵀ``; once they have
        asked for n_train columns in all, the :meth:`preconditioned` store is made (it costs
        about as much as solving n_train columns, so a run queried once never pays for it and
        one queried often pays at most twice the cheaper choice) and each query after that
        is one product.
        """
        solver = self.solver(ihvp, damping=damping)
        if self._solver_key(ihvp, damping) == (IHVPMethod.EXACT, None):
            with self._lock:
                self._exact_columns += g.shape[0]
                ready = self._precond_checked or self._exact_columns >= self.n_train
            a = self.preconditioned() if ready else None
            if a is not None:
                return a @ g.T.to(a.dtype)  # (n, m): one product
        s = solver.solve(g.T.contiguous())  # (d, m) = H⁻¹ ∇L(z_test)
        blocks = [b for _, b in self._score_blocks(s)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def scores(self, test_index: int | Sequence[int] | np.ndarray | None = None,
               ihvp: str | IHVPMethod | None = None, *, damping: float | None = None) -> np.ndarray:
        """``I_up,loss`` as float64 (n_train, n_test_selected), columns in the given order
        (``damping``: score with ``H + damping·I`` instead of the run's δ)."""
        idx = _indices(test_index, self.n_test, "test")
        g = self.test_gradients(idx)
        return self.scores_for_gradients(g, ihvp, damping=damping).cpu().double().numpy()

    def cached(self, key: tuple[str, str], compute: Callable[[], np.ndarray]) -> np.ndarray:
        """``compute()`` once per ``key`` (the result made read-only), even when threads ask at once."""
        hit = self._cache.get(key)
        if hit is None:
            with self._lock:
                hit = self._cache.get(key)
                if hit is None:
                    hit = compute()
                    hit.setflags(write=False)
                    self._cache[key] = hit
        return hit

    def predictions(self, split: str = "test") -> np.ndarray:
        """Class probabilities of every point of ``split`` ("train" or "test"), float64 (n, C), cached."""
        if split not in ("train", "test"):
            raise QueryError(f"unknown split {split!r}: use train or test")
        x = self.x_train if split == "train" else self.x_test

        def compute() -> np.ndarray:
            return np.concatenate([self.predict_proba(x[s : s + 4096]) for s in range(0, len(x), 4096)]
                                  ).astype(np.float64)

        return self.cached(("proba", split), compute)

    def train_losses(self) -> np.ndarray:
        """Data loss L(z_i, θ̂) of every training point, float64 (n_train,), cached: the simplest
        mislabel baseline to show beside self-influence."""

        def compute() -> np.ndarray:
            return torch.cat([self.objective.sample_losses(self.theta, self.x_train[s : s + 4096],
                                                           self.y_train[s : s + 4096])
                              for s in range(0, self.n_train, 4096)]).cpu().double().numpy()

        return self.cached(("train-loss", ""), compute)

    def gradient_norms(self) -> np.ndarray:
        """‖∇L(z_i, θ̂)‖ of every training point (in the store's space), float64 (n_train,), cached."""
        return self.cached(("grad-norm", ""), lambda: self.resident.row_norms().cpu().numpy())

    def self_influence(self, ihvp: str | IHVPMethod | None = None, *, block: int = 4096
                       ) -> np.ndarray:
        """``I_up,loss(z_i, z_i) = −g_iᵀ H⁻¹ g_i`` for every training point, float64 (n_train,);
        computed once per IHVP method and cached (read-only)."""
        solver = self.solver(ihvp)

        def compute() -> np.ndarray:
            out = []
            for start in range(0, self.n_train, block):
                g = self.resident.rows(slice(start, start + block))  # (b, d)
                out.append(-(g * solver.solve(g.T.contiguous()).T).sum(dim=1))
            return torch.cat(out).cpu().double().numpy()

        return self.cached(("self", solver.method.value), compute)

    def _all_test_gradients(self) -> torch.Tensor:
        """(n_test, d) gradients of every test point in the store's space, computed once."""
        if self._test_grads is None:
            with self._lock:
                if self._test_grads is None:
                    self._test_grads = self.test_gradients(np.arange(self.n_test))
        return self._test_grads

    def train_influence(self, train_index: int, ihvp: str | IHVPMethod | None = None) -> np.ndarray:
        """``I_up,loss(z_i, z_test)`` of one training point on every test point, float64 (n_test,):
        row ``train_index`` of :meth:`scores`, computed with one solve."""
        i = int(_indices(train_index, self.n_train, "train")[0])
        s = self.solver(ihvp).solve(self.resident.rows(slice(i, i + 1)).T.contiguous())  # (d, 1) = H⁻¹ ∇L(z_i)
        return (-(self._all_test_gradients() @ s)[:, 0]).cpu().double().numpy()

    def params(self, train_index: int, ihvp: str | IHVPMethod | None = None) -> np.ndarray:
        """``I_up,params(z_i) = −H⁻¹ ∇L(z_i)``, float64 (p,) in ``named_parameters()`` order."""
        if self.projector is not None:
            raise QueryError("influence on parameters needs full gradients; this run is projected")
        i = int(_indices(train_index, self.n_train, "train")[0])
        return (-self.solver(ihvp).solve(self.resident.rows(slice(i, i + 1))[0])).cpu().double().numpy()

    def topk_scores(self, s: torch.Tensor, k: int
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Helpful and harmful top-k of ``scores = −G s`` for s (d, m), in one pass over the store.

        One product ``sᵀ Gᵀ`` (m, b) per store block feeds both running top-k
        (:func:`~engine.query.topk.helpful_harmful`); the full score matrix is never formed.
        Returns ``((values, ids), (values, ids))`` for helpful (most negative first) and
        harmful (most positive first), each (k, m).
        """
        return helpful_harmful(self.resident.products_t(s.T.contiguous()), k)  # (m, d) rows

    def top_influences(self, g: torch.Tensor, *, top: int, ihvp: str | IHVPMethod | None = None
                       ) -> list[dict[str, list[dict[str, Any]]]]:
        """Per column of g (m, d): helpful (most negative first) and harmful (most positive first)."""
        if top < 1:
            raise QueryError(f"top must be at least 1, got {top}")
        s = self.solver(ihvp).solve(g.T.contiguous())  # (d, m)
        (hv, hi), (av, ai) = self.topk_scores(s, top)
        hv, hi, av, ai = (t.cpu() for t in (hv, hi, av, ai))  # one copy each from the device
        labels = self.dataset.y_train

        def rows(vals: torch.Tensor, idx: torch.Tensor, j: int) -> list[dict[str, Any]]:
            return [{"train_id": int(i), "score": float(v), "label": int(labels[int(i)])}
                    for v, i in zip(vals[:, j].tolist(), idx[:, j].tolist())]

        return [{"helpful": rows(hv, hi, j), "harmful": rows(av, ai, j)} for j in range(g.shape[0])]

    def explain(self, test_index: int, top: int = 10, ihvp: str | IHVPMethod | None = None
                ) -> dict[str, Any]:
        """The most helpful and harmful training points for one test point (REST influence shape)."""
        i = int(_indices(test_index, self.n_test, "test")[0])
        result = self.top_influences(self.test_gradients(np.array([i])), top=top, ihvp=ihvp)[0]
        proba = self.predict_proba(self.x_test[i : i + 1])[0]
        return {
            "test_id": i,
            "label": int(self.dataset.y_test[i]),
            "predicted": int(proba.argmax()),
            "probabilities": [float(p) for p in proba],
            **result,
            "ihvp": self.ihvp_report(ihvp),
        }


    def explain_input(self, x: np.ndarray, *, label: int | None = None, top: int = 10,
                      ihvp: str | IHVPMethod | None = None) -> dict[str, Any]:
        """:meth:`explain` for a new input ``x`` shaped like one data point (``input_shape``).

        The test loss is taken at ``label``, or at the predicted class when no label is given
        (then the lists explain the prediction itself)."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.shape != tuple(self.dataset.input_shape):
            raise QueryError(f"input shape {arr.shape} is not the run's {tuple(self.dataset.input_shape)}")
        xt = torch.from_numpy(arr[None]).to(self.device, self.dtype)
        proba = self.predict_proba(xt)[0]
        predicted = int(proba.argmax())
        if label is not None and not 0 <= label < self.dataset.n_classes:
            raise QueryError(f"label {label} is out of range 0..{self.dataset.n_classes - 1}")
        target = predicted if label is None else int(label)
        g = self.input_gradients(xt, torch.tensor([target]))
        result = self.top_influences(g, top=top, ihvp=ihvp)[0]
        return {"label": label, "explained_class": target, "predicted": predicted,
                "probabilities": [float(p) for p in proba], **result, "ihvp": self.ihvp_report(ihvp)}


def open_run(path: str | Path, *, device: str | None = None) -> Run:
    """Open a run folder built by :func:`engine.build`; refuses stale or incomplete runs."""
    folder = Path(path)
    if not (folder / RUN_FILE).is_file():
        raise RunError(f"{folder}: not a run folder (no {RUN_FILE}); build one with `influence build`")
    info = load_json(folder / RUN_FILE)
    if not isinstance(info, dict) or info.get("schema_version") != RUN_SCHEMA:
        found = info.get("schema_version") if isinstance(info, dict) else None
        raise RunError(f"{folder}: run schema {found} is not {RUN_SCHEMA}; rebuild it")
    try:
        BuildConfig.from_dict(info["config"])
        _ = (info["data"]["fingerprint"], info["model"]["fingerprint"], info["model"]["dtype"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{folder / RUN_FILE}: malformed ({type(exc).__name__}: {exc}); rebuild the run") from exc
    return Run(folder, info, device=device)
