"""FastIF (Guo et al. 2021): influence scored only on the test point's nearest training points.

A full-scan query scores every training point: ``−store @ s`` with ``s = H⁻¹∇L(z_test)``, one
pass over the (n, d) gradient store. FastIF first asks a kNN index for the ``candidates``
training points nearest to the test point in a cheap feature space (n, f) with f ≪ d, and
scores only those, exactly. The scores it returns are the full-scan scores of those rows; what
it trades is *recall*: a highly influential training point that is not among the neighbours is
never seen.

Feature spaces (:class:`Space`):

- ``features`` (FastIF's choice): the model's own representation, the input of its last
  ``nn.Linear`` (penultimate activations for ``mlp``/``cnn``; for ``logreg``/``svm``, whose last
  Linear is the whole model, the flattened input). TorchScript models cannot take forward hooks,
  and models without an ``nn.Linear`` have no such layer: both fall back to the flattened input.
- ``gradients``: the gradient-store rows themselves (d-dimensional, so the search costs about
  as much as a full scan; useful to compare spaces, not for speed).

An optional ``pool`` (not in FastIF) adds the training points with the largest gradient norms
to every candidate set: high-loss points that are influential without being near the test point.
On ``bench/fastif_bench.py`` (augmented digits, mlp) plain FastIF's recall@10 of the full scan
falls from 0.95 at 1.3k training points (1,000 candidates) to 0.04 at 200k; a pool of about 2%
of the training set brings it to 0.96–0.99 up to 200k.

The index (:class:`KNNIndex`) is an exact FAISS ``IndexFlatL2`` (or ``IndexFlatIP`` on
L2-normalised rows for ``cosine``) when ``faiss`` is importable (``pip install .[fastif]``), else
an exact blocked brute-force search in torch. Train features, the index and the pools are kept in
the run's bounded cache (:mod:`engine.cache`: keyed, locked per key, within its byte budget).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import QueryError
from ..models.objective import Objective
from ..store.resident import block_product
from .scoring import check_indices
from .topk import RunningTopK

if TYPE_CHECKING:
    from ..config import IHVPMethod
    from ..run import Run

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_METRIC",
    "DEFAULT_SPACE",
    "KNNIndex",
    "Metric",
    "Space",
    "faiss_available",
    "fastif_candidates",
    "fastif_top_influences",
    "gradient_norm_order",
    "penultimate_features",
    "run_index",
    "train_features",
]


class Space(str, Enum):
    """Where FastIF looks for neighbours."""

    FEATURES = "features"  # input of the model's last nn.Linear
    GRADIENTS = "gradients"  # rows of the gradient store


class Metric(str, Enum):
    """Distance of the kNN search."""

    L2 = "l2"  # Euclidean (FastIF's choice)
    COSINE = "cosine"  # inner product of L2-normalised rows


DEFAULT_CANDIDATES = 100
DEFAULT_SPACE = Space.FEATURES
DEFAULT_METRIC = Metric.L2
FEATURE_BATCH = 4096  # samples per forward pass when extracting features
SEARCH_BLOCK = 65536  # index rows per block of the brute-force search


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _parse(enum: type[Space | Metric], value: str | Enum) -> Any:
    try:
        return enum(value)
    except ValueError:
        raise QueryError(f"unknown {enum.__name__.lower()} {value!r}: use one of "
                         f"{', '.join(m.value for m in enum)}") from None


# ---------------------------------------------------------------------- features
def _last_linear(model: nn.Module) -> nn.Linear | None:
    if isinstance(model, torch.jit.ScriptModule):
        return None  # no forward hooks on TorchScript modules
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def penultimate_features(objective: Objective, theta: torch.Tensor, x: torch.Tensor, *,
                         batch: int = FEATURE_BATCH) -> torch.Tensor:
    """The input of the model's last ``nn.Linear`` at θ for inputs x (b, *input_shape) → (b, f).

    Taken with a forward hook on the module this thread holds (:meth:`Objective.holding`). For a
    model without an ``nn.Linear`` (or a TorchScript one) this is the flattened input
    (b, prod(input_shape)).
    """
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        captured.append(inputs[0].detach().flatten(1))  # (b, f)

    with objective.holding() as module:  # the module this thread runs: hook that one
        last = _last_linear(module)
        if last is None:
            return objective.as_input(x).flatten(1)
        handle = last.register_forward_hook(hook)
        try:
            with torch.no_grad():
                for start in range(0, len(x), batch):
                    objective.logits(theta, x[start : start + batch])
        finally:
            handle.remove()
    return torch.cat(captured)


def _query_features(run: Run, space: Space, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(m, f) query rows for test inputs x and their store-space gradients g (m, d)."""
    if space is Space.GRADIENTS:
        return g
    return penultimate_features(run.model.objective, run.model.theta, x)


def train_features(run: Run, space: str | Space = DEFAULT_SPACE) -> np.ndarray:
    """Float32 (n_train, f) index rows of ``space`` for every training point; cached on the run."""
    sp: Space = _parse(Space, space)

    def compute() -> np.ndarray:
        if sp is Space.GRADIENTS:  # converted block by block: no full copy in the compute dtype
            return run.store.resident.to_numpy(np.float32)
        rows = penultimate_features(run.model.objective, run.model.theta, run.data.x_train)
        return np.ascontiguousarray(rows.detach().cpu().numpy(), dtype=np.float32)

    return run.cache.get(("knn-features", sp.value), compute)


# ---------------------------------------------------------------------- index
class KNNIndex:
    """Exact k-nearest-neighbour search over rows (n, f): FAISS flat index, or torch brute force.

    ``backend="auto"`` uses FAISS when it is importable. Both compute in float32; results agree
    up to ties at float32 resolution.
    """

    def __init__(self, rows: np.ndarray, *, metric: str | Metric = DEFAULT_METRIC,
                 backend: str = "auto") -> None:
        self.metric: Metric = _parse(Metric, metric)
        if backend not in ("auto", "faiss", "torch"):
            raise QueryError(f"unknown kNN backend {backend!r}: use auto, faiss or torch")
        if backend == "auto":
            backend = "faiss" if faiss_available() else "torch"
        self.backend = backend
        data = np.ascontiguousarray(rows, dtype=np.float32)  # (n, f)
        if data.ndim != 2 or len(data) == 0:
            raise QueryError(f"a kNN index needs a non-empty (n, f) array, got shape {data.shape}")
        self.n, self.dim = data.shape
        self.nbytes = int(data.nbytes)  # one float32 copy of the rows (FAISS or torch): counted by the cache
        if self.metric is Metric.COSINE:
            data = _normalise(data)
        if backend == "faiss":
            import faiss

            self._faiss = (faiss.IndexFlatL2 if self.metric is Metric.L2 else faiss.IndexFlatIP)(self.dim)
            self._faiss.add(data)
        else:
            self._rows = torch.from_numpy(data.copy())  # (n, f), writable for torch
            self._sq = (self._rows * self._rows).sum(1)  # (n,)

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances and row ids (m, min(k, n)), nearest first.

        Distance is the squared Euclidean distance (``l2``) or ``1 − cosine`` (``cosine``).
        """
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().cpu().numpy()
        q = np.ascontiguousarray(queries, dtype=np.float32)  # (m, f)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise QueryError(f"queries of shape {q.shape} do not match the index dimension {self.dim}")
        k = min(int(k), self.n)
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        if self.metric is Metric.COSINE:
            q = _normalise(q)
        if self.backend == "faiss":
            dist, ids = self._faiss.search(q, k)
        else:
            dist, ids = self._brute_force(torch.from_numpy(q), k)
        if self.metric is Metric.COSINE:
            dist = 1.0 - dist  # FAISS and the fallback both return inner products here
        return dist.astype(np.float32), ids.astype(np.int64)

    def _brute_force(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        # streamed over row blocks, the running top-k keeps k rows per query between blocks
        largest = self.metric is Metric.COSINE
        best = RunningTopK(k, largest=largest)
        q_sq = (q * q).sum(1)  # (m,)
        for start in range(0, self.n, SEARCH_BLOCK):
            rows = self._rows[start : start + SEARCH_BLOCK]  # (b, f)
            ip = rows @ q.T  # (b, m)
            if largest:
                best.update(start, ip)
            else:
                best.update(start, (self._sq[start : start + SEARCH_BLOCK, None] - 2 * ip
                                    + q_sq[None, :]).clamp_min(0))
        vals, idx = best.result()  # (k, m)
        return vals.T.numpy(), idx.T.numpy()


def _normalise(a: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return np.ascontiguousarray(a / np.maximum(norm, np.finfo(np.float32).tiny), dtype=np.float32)


def run_index(run: Run, *, space: str | Space = DEFAULT_SPACE, metric: str | Metric = DEFAULT_METRIC,
              backend: str = "auto") -> KNNIndex:
    """The kNN index over ``run``'s training points in ``space``, built once and kept in the
    run's cache."""
    sp: Space = _parse(Space, space)
    mt: Metric = _parse(Metric, metric)
    return run.cache.get(("knn-index", sp.value, mt.value, backend),
                         lambda: KNNIndex(train_features(run, sp), metric=mt, backend=backend))


# ---------------------------------------------------------------------- queries
def _nonempty(idx: np.ndarray, given: object) -> np.ndarray:
    if idx.size == 0:
        raise QueryError(f"test index must be one or more integers, got {given!r}")
    return idx


def gradient_norm_order(run: Run) -> np.ndarray:
    """Training ids by decreasing store-row norm ‖∇L(z_i)‖ (int64 (n_train,)); cached on the run."""

    def compute() -> np.ndarray:
        return np.argsort(-run.gradient_norms(), kind="stable").astype(np.int64)

    return run.cache.get(("knn-grad-norm-order",), compute)


def _pool(run: Run, size: int) -> tuple[np.ndarray, torch.Tensor]:
    """The pool's ids and a contiguous copy of their store rows (store dtype), kept in the
    run's bounded cache per pool size (a request parameter: the budget bounds them all)."""

    def compute() -> tuple[np.ndarray, torch.Tensor]:
        ids = gradient_norm_order(run)[:size]
        return ids, run.store.resident.data[torch.as_tensor(ids, device=run.device)]

    return run.cache.get(("knn-pool", int(size)), compute)


def fastif_candidates(run: Run, test_index: int | Sequence[int] | np.ndarray, *,
                      candidates: int = DEFAULT_CANDIDATES, pool: int = 0,
                      ihvp: str | IHVPMethod | None = None, space: str | Space = DEFAULT_SPACE,
                      metric: str | Metric = DEFAULT_METRIC, backend: str = "auto"
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per test point: candidate training ids (c,) and their exact ``I_up,loss`` scores (c,).

    Candidates are the ``min(candidates, n_train)`` nearest training points (nearest first),
    then the ``pool`` training points with the largest gradient norms that are not already
    among them (see :func:`fastif_top_influences`). One solve ``S = H⁻¹ [∇L(z_test_1) …]``
    (d, m), then ``scores_j = −store[ids_j] @ S[:, j]``: the same numbers as column j of
    :meth:`Run.scores` on those rows. Ids int64, scores float64. On an ensemble run the
    candidates are member 0's and each score is the members' mean (as :meth:`Run.scores`).
    """
    if candidates < 1:
        raise QueryError(f"candidates must be at least 1, got {candidates}")
    if pool < 0:
        raise QueryError(f"pool must be >= 0, got {pool}")
    sp: Space = _parse(Space, space)
    idx = _nonempty(check_indices(test_index, run.n_test, "test"), test_index)
    index = run_index(run, space=sp, metric=metric, backend=backend)  # built before the query
    outliers, outlier_rows = _pool(run, pool) if pool else (None, None)
    g = run.queries.test_gradients(idx)  # (m, d)
    s = run.solver(ihvp).solve(g.T.contiguous())  # (d, m) = H⁻¹ ∇L(z_test)
    query = _query_features(run, sp, run.data.x_test[torch.as_tensor(idx, device=run.device)], g)  # (m, f)
    _, near = index.search(query, min(candidates, run.n_train))  # (m, c)
    # the pool's rows are one contiguous block, scored for every test point in one product
    pool_scores = None
    if outlier_rows is not None:
        pool_scores = (-block_product(outlier_rows, s)).cpu().double().numpy()  # (P, m)
    out = []
    for j in range(len(idx)):
        near_j = torch.as_tensor(near[j], device=run.device)
        ids = near[j]
        scores = (-run.store.resident.rows_product(near_j, s[:, j : j + 1])[:, 0]).cpu().double().numpy()  # (c,)
        if outliers is not None and pool_scores is not None:
            new = ~np.isin(outliers, ids)
            ids = np.concatenate([ids, outliers[new]])
            scores = np.concatenate([scores, pool_scores[new, j]])
        out.append((ids, scores))
    if run.ensemble is not None:  # the same candidates (member 0's), scored by every member
        return _ensemble_scores(run, idx, out, ihvp)
    return out


def _ensemble_scores(run: Run, idx: np.ndarray, found: list[tuple[np.ndarray, np.ndarray]],
                     ihvp: str | IHVPMethod | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Member 0's candidates with the mean of every member's own score (``found`` holds member
    0's). The kNN index, features and pool stay member 0's: candidates are where to look."""
    assert run.ensemble is not None
    totals = [scores.copy() for _, scores in found]
    for r in run.ensemble.members()[1:]:
        s = r.solver(ihvp).solve(r.queries.test_gradients(idx).T.contiguous())  # (d, m)
        for j, (ids, _) in enumerate(found):
            rows = torch.as_tensor(ids, device=r.device)
            totals[j] -= r.store.resident.rows_product(rows, s[:, j : j + 1])[:, 0].cpu().double().numpy()
    return [(ids, total / run.ensemble.size) for (ids, _), total in zip(found, totals)]


def fastif_top_influences(run: Run, test_index: int | Sequence[int] | np.ndarray, *, top: int = 10,
                          candidates: int = DEFAULT_CANDIDATES, pool: int = 0,
                          ihvp: str | IHVPMethod | None = None, space: str | Space = DEFAULT_SPACE,
                          metric: str | Metric = DEFAULT_METRIC, backend: str = "auto"
                          ) -> list[dict[str, Any]]:
    """FastIF: the most helpful and harmful training points among each test point's kNN candidates.

    FastIF (Guo, Rajani, Hase, Bansal & Xiong, "FastIF: Scalable Influence Functions for
    Efficient Model Interpretation and Debugging", EMNLP 2021) restricts the influence search to
    the ``candidates`` training points nearest to the test point in the model's feature space
    (see the module docstring for the spaces), then scores those exactly with the contract's
    ``I_up,loss = −∇L(z_test)ᵀ H⁻¹ ∇L(z_i)`` (negative helpful, positive harmful). Scores of
    returned points equal the full scan's; the lists may miss influential points outside the
    candidate set (a recall trade-off). With ``candidates >= n_train`` the lists equal
    :meth:`Run.explain`'s up to exact ties.

    ``pool`` (not part of FastIF; 0 turns it off) adds the ``pool`` training points with the
    largest gradient norms ‖∇L(z_i)‖ to every candidate set. Influence scales with that norm,
    so high-loss points can be among the most influential for a test point without being near
    it; they are what feature-space kNN misses most, above all in the harmful list.

    Defaults: ``top=10``, ``candidates=100``, ``pool=0``, ``space="features"``, ``metric="l2"``,
    the run's own IHVP method, FAISS when installed. The first query on a run also extracts the
    train features and builds the index (cached for the run's lifetime).

    Returns one dict per test point, in the given order:
    ``{"test_id", "helpful": [...], "harmful": [...], "candidates": c, "seconds": t}``; list
    entries are ``{"train_id", "score", "label"}`` as in :meth:`Run.explain`, helpful most
    negative first, harmful most positive first; ``c`` is the number of points scored.
    ``seconds`` is the call's wall time divided by the number of test points (for one point,
    its latency).
    """
    if top < 1:
        raise QueryError(f"top must be at least 1, got {top}")
    if candidates < top:
        raise QueryError(f"candidates ({candidates}) must be at least top ({top})")
    t0 = time.perf_counter()
    idx = _nonempty(check_indices(test_index, run.n_test, "test"), test_index)
    found = fastif_candidates(run, idx, candidates=candidates, pool=pool, ihvp=ihvp, space=space,
                              metric=metric, backend=backend)
    labels = run.dataset.y_train
    out = []
    for i, (ids, scores) in zip(idx, found):
        k = min(top, len(ids))
        order = np.argsort(scores, kind="stable")  # most negative first

        def rows(sel: np.ndarray, ids: np.ndarray = ids, scores: np.ndarray = scores
                 ) -> list[dict[str, Any]]:
            return [{"train_id": int(ids[c]), "score": float(scores[c]), "label": int(labels[ids[c]])}
                    for c in sel]

        out.append({"test_id": int(i), "helpful": rows(order[:k]), "harmful": rows(order[::-1][:k]),
                    "candidates": len(ids)})
    seconds = (time.perf_counter() - t0) / len(idx)
    for item in out:
        item["seconds"] = seconds
    return out
