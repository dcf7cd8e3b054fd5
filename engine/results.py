"""Typed results of the engine's queries: arrays with their meaning, turned into the contract's
REST-shaped dicts only at the edge (:meth:`TopInfluences.lists`, :meth:`GroupResult.to_dict`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["GroupResult", "TopInfluences"]


@dataclass(frozen=True)
class TopInfluences:
    """The top-k helpful and harmful training points of m queries.

    ``helpful_ids`` / ``helpful_scores`` (k, m): most negative ``I_up,loss`` first;
    ``harmful_ids`` / ``harmful_scores`` (k, m): most positive first. ``diagnostics``: the solve's.
    ``consistency`` (ensembles only, :mod:`engine.ensemble`): per side, per query, one dict per
    listed point (``{"agree", "agree_count", "members", "same_sign", "cv"}``), added to its item.
    """

    helpful_ids: np.ndarray  # (k, m) int64
    helpful_scores: np.ndarray  # (k, m) float64
    harmful_ids: np.ndarray  # (k, m) int64
    harmful_scores: np.ndarray  # (k, m) float64
    diagnostics: dict[str, Any] = field(default_factory=dict)
    consistency: dict[str, list[list[dict[str, Any]]]] | None = None

    def lists(self, j: int, labels: np.ndarray) -> dict[str, list[dict[str, Any]]]:
        """Query j as the REST influence route's ``{"helpful": [...], "harmful": [...]}``, each
        entry ``{"train_id", "score", "label"}`` (and ``"consistency"`` on an ensemble)."""

        def rows(side: str, ids: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
            out = [{"train_id": int(i), "score": float(s), "label": int(labels[int(i)])}
                   for i, s in zip(ids[:, j].tolist(), scores[:, j].tolist())]
            if self.consistency is not None:
                for item, c in zip(out, self.consistency[side][j]):
                    item["consistency"] = c
            return out

        return {"helpful": rows("helpful", self.helpful_ids, self.helpful_scores),
                "harmful": rows("harmful", self.harmful_ids, self.harmful_scores)}


@dataclass(frozen=True)
class GroupResult:
    """Predicted effect of removing a group U of training points on m test losses.

    ``predicted_loss_change`` (m,): the predicted change of each test loss when U is removed;
    ``influence`` (m,) = ``−n · predicted_loss_change`` (``I_up,loss`` units).
    """

    order: int
    group_size: int
    ihvp: str
    test_ids: np.ndarray  # (m,) int64
    predicted_loss_change: np.ndarray  # (m,) float64
    influence: np.ndarray  # (m,) float64

    def to_dict(self) -> dict[str, Any]:
        """The REST group-influence shape."""
        return {"order": self.order, "group_size": self.group_size, "ihvp": self.ihvp,
                "results": [{"test_id": int(t), "influence": float(i), "predicted_loss_change": float(c)}
                            for t, i, c in zip(self.test_ids, self.influence, self.predicted_loss_change)]}
