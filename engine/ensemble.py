"""Ensembles: N independently seeded models of one run, their influence scores averaged.

``build(..., ensemble=N)`` trains member 0 (the run itself, training seed S = ``--seed``) and
members 1..N−1 as complete runs in ``RUN/members/<j>/`` with training seed S + j: each has its own
θ̂ (a different initialisation and batch order), gradient store and curvature. Every member
sees the same data (loaded with seed S) and the same projection seed; only the model differs.
An ensemble of a convex model would be N copies of one optimum, and a user model is one trained
model with nothing to reseed: both are refused.

A query on an ensemble run averages the members' own ``I_up,loss`` (each with its own solver,
at the same method and damping):

    Ī(z_i, z_test) = (1/N) Σ_j I_up,loss^(j)(z_i, z_test)

and the ranking shown is that of Ī. Per shown training point, :func:`consistency` says how far
the members agree: the share of members whose own score has the sign of Ī *and* that put the
point in their own top-K on that side, the share with the same sign, and the coefficient of
variation ``std_j / |Ī|`` (population std over members).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .cache import BoundedCache
from .config import BuildConfig, ModelKind
from .errors import InfluenceError, StaleRunError
from .results import TopInfluences

if TYPE_CHECKING:
    from .run import Run

__all__ = ["MEMBERS_DIR", "Ensemble", "KeyedCache", "averaged_top", "check_ensemble", "consistency",
           "member_folder", "member_seed", "record_ensemble", "summary"]

MEMBERS_DIR = "members"  # RUN/members/<j>/: member j ≥ 1, a complete run folder

T = TypeVar("T")


def member_folder(run_path: Path, j: int) -> Path:
    """The folder of member ``j`` ≥ 1 of the ensemble run in ``run_path`` (member 0 is the run)."""
    return Path(run_path) / MEMBERS_DIR / str(j)


def member_seed(seed: int, j: int) -> int:
    """Member j's training seed (initialisation and batch order): the run's seed plus j."""
    return seed + j


def check_ensemble(config: BuildConfig, kind: ModelKind) -> None:
    """Refuse (InfluenceError) an ensemble size below 1, and ensembles of models that cannot
    differ: a convex model (every seed reaches the same optimum) or a user model (trained once,
    outside; nothing to reseed)."""
    n = config.ensemble
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InfluenceError(f"--ensemble must be an integer >= 1, got {n!r}")
    if n == 1:
        return
    if kind is ModelKind.USER:
        raise InfluenceError("--ensemble needs a built-in network (mlp, cnn, resnet): a user model "
                             "is taken as already trained, so there is nothing to reseed")
    if kind.convex:
        raise InfluenceError(f"--ensemble needs a network: {kind.value} is convex, so every seed "
                             "trains to the same optimum and the members would be copies")


class KeyedCache:
    """A view of a :class:`BoundedCache` whose keys carry a prefix: members of an ensemble keep
    their caches in the run's one budget without colliding with each other or the run."""

    def __init__(self, parent: BoundedCache, prefix: Hashable) -> None:
        self.parent, self.prefix = parent, prefix

    def get(self, key: Hashable, compute: Callable[[], T], *, read_only: bool = True) -> T:
        return self.parent.get((self.prefix, key), compute, read_only=read_only)

    def __contains__(self, key: Hashable) -> bool:
        return (self.prefix, key) in self.parent


def record_ensemble(info: dict[str, Any], members: list[dict[str, Any]], config: BuildConfig) -> None:
    """Member 0's ``run.json`` content gains the ensemble (members, training seeds, folders, each
    member's accuracies and build time); its ``total_s`` becomes the whole build's."""
    runs = [info, *members]
    n = config.ensemble
    info["ensemble"] = {
        "members": n, "seeds": [member_seed(config.seed, j) for j in range(n)],
        "folders": ["."] + [f"{MEMBERS_DIR}/{j}" for j in range(1, n)],
        "test_accuracy": [r["training"].get("test_accuracy") for r in runs],
        "train_accuracy": [r["training"].get("train_accuracy") for r in runs],
        "build_s": [r["timings"].get("total_s") for r in runs]}
    info["timings"]["members_s"] = sum(r["timings"].get("total_s", 0.0) for r in members)
    info["timings"]["total_s"] = sum(info["ensemble"]["build_s"])


# ---------------------------------------------------------------------- consistency
def consistency(member_scores: np.ndarray, ids: np.ndarray, *, side: int, top: int
                ) -> dict[str, np.ndarray]:
    """How far N members agree on training points ``ids`` (k,) shown on one side of a ranking.

    ``member_scores`` (N, n): each member's own ``I_up,loss`` of every training point on one test
    point. ``side`` −1 (helpful: negative scores, most negative first) or +1 (harmful). Returns
    arrays (k,): ``agree``, the share of members whose score has that sign and whose own top-``top``
    on that side contains the point (a point is in a member's top-K when fewer than K of that
    member's scores are further on the side); ``same_sign``, the share with that sign; ``mean``
    and ``std`` (population) of the members' scores; ``cv`` = std / |mean| (inf where mean is 0).
    """
    if side not in (-1, 1):
        raise ValueError(f"side must be -1 or 1, got {side}")
    key = side * np.asarray(member_scores, dtype=np.float64)  # (N, n): larger = further on the side
    n = key.shape[1]
    k = min(int(top), n)
    kth = np.partition(key, n - k, axis=1)[:, n - k]  # (N,) each member's k-th largest
    picked = key[:, ids]  # (N, k)
    same = picked > 0
    agree = (same & (picked >= kth[:, None])).mean(axis=0)
    scores = np.asarray(member_scores, dtype=np.float64)[:, ids]  # (N, k)
    mean, std = scores.mean(axis=0), scores.std(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv = np.where(mean != 0, std / np.abs(mean), np.inf)
    return {"agree": agree, "same_sign": same.mean(axis=0), "mean": mean, "std": std, "cv": cv}


def _items(c: dict[str, np.ndarray], members: int) -> list[dict[str, Any]]:
    """Per shown point, the REST item's ``consistency`` field."""
    return [{"agree": float(a), "agree_count": round(float(a) * members), "members": members,
             "same_sign": float(s), "cv": float(v) if np.isfinite(v) else None}
            for a, s, v in zip(c["agree"], c["same_sign"], c["cv"])]


def averaged_top(member_scores: np.ndarray, top: int, *, diagnostics: dict[str, Any] | None = None
                 ) -> TopInfluences:
    """Top-``top`` helpful and harmful points of the members' mean score, for one query.

    ``member_scores`` (N, n) float64. The lists rank ``Ī = mean_j scores_j`` (helpful most
    negative first, harmful most positive first; ties by training id) and carry each shown
    point's :func:`consistency` across the N members."""
    mean = member_scores.mean(axis=0)  # (n,)
    n = mean.shape[0]
    k = min(int(top), n)

    def best(key: np.ndarray) -> np.ndarray:  # the k smallest of key, ascending, ties by id
        part = np.argpartition(key, k - 1)[:k] if k < n else np.arange(n)
        return part[np.lexsort((part, key[part]))]

    helpful, harmful = best(mean), best(-mean)
    members = member_scores.shape[0]
    return TopInfluences(
        helpful[:, None], mean[helpful][:, None], harmful[:, None], mean[harmful][:, None],
        diagnostics or {},
        consistency={"helpful": [_items(consistency(member_scores, helpful, side=-1, top=k), members)],
                     "harmful": [_items(consistency(member_scores, harmful, side=1, top=k), members)]})


def summary(found: TopInfluences, *, members: int, seeds: list[int]) -> dict[str, Any]:
    """The ``ensemble`` field of an explanation: size, seeds and the mean agreement shown."""
    shown = [c["agree"] for side in ("helpful", "harmful") for c in (found.consistency or {}).get(side, [[]])[0]]
    return {"members": members, "seeds": seeds,
            "mean_agree": float(np.mean(shown)) if shown else None}


# ---------------------------------------------------------------------- the members
class Ensemble:
    """The members of an ensemble run: member 0 is the run itself, members 1..N−1 are opened
    on first use by ``opener(j)`` (thread-safe) and kept."""

    def __init__(self, run: Run, opener: Callable[[int], Run]) -> None:
        self.run = run
        self.size = run.config.ensemble
        self._opener = opener
        self._members: dict[int, Run] = {0: run}
        self._lock = threading.Lock()

    @property
    def seeds(self) -> list[int]:
        return [member_seed(self.run.config.seed, j) for j in range(self.size)]

    def member(self, j: int) -> Run:
        """Member ``j`` (0 ≤ j < N), opened and checked against the run on first use."""
        if not 0 <= j < self.size:
            raise IndexError(f"member {j} is out of range 0..{self.size - 1}")
        with self._lock:
            if j not in self._members:
                member = self._opener(j)
                check_member(self.run, member, j)
                self._members[j] = member
            return self._members[j]

    def members(self) -> list[Run]:
        return [self.member(j) for j in range(self.size)]

    def mean(self, fn: Callable[[Run], np.ndarray]) -> np.ndarray:
        """``(1/N) Σ_j fn(member_j)`` as float64, summed as it goes (one member's result at a time)."""
        total: np.ndarray | None = None
        for j in range(self.size):
            part = np.asarray(fn(self.member(j)), dtype=np.float64)
            total = part.copy() if total is None else total + part
        assert total is not None
        return total / self.size

    def stack(self, fn: Callable[[Run], np.ndarray]) -> np.ndarray:
        """``fn`` of every member, stacked as float64 (N, ...)."""
        return np.stack([np.asarray(fn(m), dtype=np.float64) for m in self.members()])


def check_member(run: Run, member: Run, j: int) -> None:
    """Refuse (StaleRunError) a member folder that is not member j of this run's ensemble."""
    meta = member.info.raw.get("ensemble", {})
    want = {k: v for k, v in run.config.to_dict().items() if k != "ensemble"}
    have = {k: v for k, v in member.config.to_dict().items() if k != "ensemble"}
    if (meta.get("member") != j or member.info.data.fingerprint != run.info.data.fingerprint
            or have != want):
        raise StaleRunError(f"{member.path}: not member {j} of the ensemble {run.path} (other "
                            "settings or data); rebuild the run")
