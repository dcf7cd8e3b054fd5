"""The mislabel check: how well do this run's scores find the training labels flipped on purpose?

A run built with ``--label-noise F`` records which training labels it flipped
(``run.dataset.flipped``). Each score below ranks the training points from most to least
suspicious, and is judged against those flips:

- ``self_influence``: ``|I_up,loss(z_i, z_i)| = |g_iᵀ H⁻¹ g_i|`` (Koh & Liang 2017 §5.4: its
  magnitude ranks likely mislabelled points), under the run's IHVP method or the one asked for;
- ``loss``: the training loss ``L(z_i, θ̂)`` (cross-entropy; the smooth hinge for ``svm``);
- ``grad_norm``: ``‖∇θL(z_i, θ̂)‖`` from the gradient store, i.e. over the tracked parameters,
  and in the projected space when the store is projected (``‖P ᵀg_i‖``, not ``‖g_i‖``).

Per score: the ROC AUC against the flip indicator (the Mann–Whitney statistic, ties counted
one half) and ``recall@p%``, the share of flipped points found among the ``⌈p·n/100⌉``
highest-ranked ones (with 10% of labels flipped, recall@10% = 1 is a perfect ranking).
The report is saved as ``mislabel.json`` in the run folder and read back by :func:`load_mislabel`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from .errors import InfluenceError
from .run import Run
from .store.files import load_run_report, save_json

__all__ = ["MISLABEL_FILE", "MislabelScore", "load_mislabel", "mislabel_check", "recall_at", "roc_auc"]

MISLABEL_FILE = "mislabel.json"
DEFAULT_PERCENTS = (1, 5, 10, 20)


class MislabelScore(str, Enum):
    """The rankings judged against the recorded flips."""

    SELF_INFLUENCE = "self_influence"
    LOSS = "loss"
    GRAD_NORM = "grad_norm"


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``score`` (n,) against the boolean ``positive`` (n,), higher = more positive.

    The Mann–Whitney form: with average ranks r (ties share the mean of their ranks),
    ``AUC = (Σ_{i positive} r_i − n₊(n₊+1)/2) / (n₊ n₋)``, the probability that a random
    positive outscores a random negative, ties counting one half.
    """
    s = np.asarray(score, dtype=np.float64).ravel()  # (n,)
    pos = np.asarray(positive, dtype=bool).ravel()  # (n,)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise InfluenceError("AUC needs both flipped and clean training points")
    ranks = rankdata(s)  # (n,) average ranks, 1-based
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def top_count(n: int, percent: float) -> int:
    """How many of ``n`` ranked points make the top ``percent``%: ``⌈percent·n/100⌉``, at least 1."""
    return max(1, min(n, math.ceil(percent * n / 100 - 1e-9)))


def recall_at(score: np.ndarray, positive: np.ndarray, percent: float) -> float:
    """Share of the positives among the ``⌈percent·n/100⌉`` highest scores (n,).

    Ties at the cut are broken by index (a stable sort of ``−score``), so the figure is
    deterministic."""
    s = np.asarray(score, dtype=np.float64).ravel()  # (n,)
    pos = np.asarray(positive, dtype=bool).ravel()  # (n,)
    if not pos.any():
        raise InfluenceError("recall needs at least one flipped training point")
    top = np.argsort(-s, kind="stable")[: top_count(s.size, percent)]  # (k,)
    return float(pos[top].sum() / pos.sum())


def _percent_key(p: float) -> str:
    return f"{p:g}"


def _rankings(run: Run, ihvp: str | None) -> dict[MislabelScore, tuple[Callable[[], np.ndarray], str]]:
    space = "projected gradient (store rows)" if run.store.projected else "gradient (store rows)"
    return {
        MislabelScore.SELF_INFLUENCE: (lambda: np.abs(run.self_influence(ihvp)),
                                       "|I_up,loss(z_i, z_i)|, larger = more suspicious"),
        MislabelScore.LOSS: (run.train_losses, "training loss L(z_i, θ̂)"),
        MislabelScore.GRAD_NORM: (run.gradient_norms, f"‖∇θL(z_i, θ̂)‖ of the tracked {space}"),
    }


def mislabel_check(run: Run, *, ihvp: str | None = None,
                   percents: Sequence[float] = DEFAULT_PERCENTS, save: bool = True,
                   callback: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """AUC and recall@p% of every mislabel score against the run's recorded label flips.
    ``callback(done, total)`` runs at the start and after each score (self-influence, the
    longest, first); an exception it raises (a cancelled job) stops the check, nothing saved.

    Returns (and with ``save`` writes to ``mislabel.json``) ``{"n_train", "n_flipped",
    "label_noise", "ihvp", "scores": [{"score", "auc", "recall": {"p": r}, "seconds",
    "detail"}], "seconds", "created"}``; scores in :class:`MislabelScore` order.

    Raises:
        InfluenceError: the run was built without ``--label-noise`` (nothing to score against).
    """
    t0 = time.perf_counter()
    flipped = np.asarray(run.dataset.flipped, dtype=np.int64)  # (n_flipped,)
    if flipped.size == 0:
        raise InfluenceError("this run has no recorded label flips: build the run with "
                             "--label-noise F, e.g. 0.1, to measure mislabel detection")
    if flipped.size == run.n_train:
        raise InfluenceError("every training label is flipped: AUC needs clean points too")
    positive = np.zeros(run.n_train, dtype=bool)  # (n,)
    positive[flipped] = True
    method = run.solver(ihvp).method.value
    rows = []
    rankings = _rankings(run, ihvp)
    if callback:
        callback(0, len(rankings))
    for name, (compute, detail) in rankings.items():
        t = time.perf_counter()
        score = np.asarray(compute(), dtype=np.float64)  # (n,)
        rows.append({"score": name.value, "auc": roc_auc(score, positive),
                     "recall": {_percent_key(p): recall_at(score, positive, p) for p in percents},
                     "seconds": time.perf_counter() - t, "detail": detail})
        if callback:
            callback(len(rows), len(rankings))
    report = {
        "n_train": run.n_train,
        "n_flipped": int(flipped.size),
        "label_noise": float(run.info.data.label_noise),
        "ihvp": method,
        "scores": rows,
        "seconds": time.perf_counter() - t0,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if save:
        save_json(run.path / MISLABEL_FILE, report)
    return report


def load_mislabel(run_or_path: Run | str | Path) -> dict[str, Any] | None:
    """The saved mislabel report of a run (or run folder), or None when it has not been checked."""
    return load_run_report(run_or_path, MISLABEL_FILE)
