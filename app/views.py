"""View-models: how the pages present what :class:`app.services.Dashboard` computed (levels,
summaries, badges), pure functions of its dicts, kept out of the routers so they are tested
without a server."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .services import Dashboard

__all__ = ["LDS_REFERENCES", "TRUST_FAIR", "TRUST_GOOD", "TRUST_NOISY", "change_summary", "lds_view",
           "reliability_view", "trust_badge", "trust_level", "trust_view"]

# the trust badge: Pearson of predicted vs actual retraining at or above GOOD is green, at or
# above FAIR amber, below it red; a noise floor above NOISY × mean |actual change| is flagged
TRUST_GOOD, TRUST_FAIR, TRUST_NOISY = 0.9, 0.7, 0.2


def trust_level(pearson: float) -> str:
    """``good``, ``fair`` or ``poor`` by the thresholds above."""
    return "good" if pearson >= TRUST_GOOD else "fair" if pearson >= TRUST_FAIR else "poor"


def trust_view(trust: Mapping[str, Any], *, method: str | None = None,
               damping: float | None = None) -> dict[str, Any]:
    """How a page shows the run's trust check (:meth:`Dashboard.trust`): the result row for the
    page's IHVP method and damping (the best row when that one was not checked), its level
    (``good``/``fair``/``poor`` by Pearson, ``unchecked``, or ``failed`` when every row is an
    error), whether the noise floor is too close to the signal, and every row with its level."""
    if not trust.get("checked"):
        return {"level": "unchecked", "how": trust.get("how", "influence trust --run RUN")}
    rows = [{**r, "level": trust_level(r["pearson"]) if "pearson" in r else "error"}
            for r in trust["results"]]
    ok = [r for r in rows if "pearson" in r]
    row = next((r for r in ok if r["method"] == method
                and (damping is None or r["damping"] == damping)), None)
    if row is None and trust.get("best") is not None:
        row = next(r for r in ok if (r["method"], r["damping"]) == (trust["best"]["method"],
                                                                    trust["best"]["damping"]))
    noisy = trust["noise_floor"] > TRUST_NOISY * trust["mean_abs_actual"]
    return {"level": row["level"] if row else "failed", "row": row, "rows": rows,
            "same_method": row is not None and row["method"] == method,
            "ground_truth": trust["ground_truth"], "noisy": noisy, "noisy_share": TRUST_NOISY,
            "thresholds": {"good": TRUST_GOOD, "fair": TRUST_FAIR}}


def trust_badge(dash: Dashboard, method: str) -> dict[str, Any]:
    """The trust badge of a detail page whose scores come from ``method`` at the run's damping."""
    return trust_view(dash.trust(), method=method, damping=dash.run.config.damping)


def change_summary(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The service's predicted test-loss changes of one order, read off for the page's table:
    their mean and mean magnitude, and the largest fall and rise with their test points."""
    v = np.array([r["predicted_loss_change"] for r in results], dtype=np.float64)  # (n_tests,)
    lo, hi = int(v.argmin()), int(v.argmax())
    return {"n": int(v.size), "mean": float(v.mean()), "mean_abs": float(np.abs(v).mean()),
            "min": float(v[lo]), "min_test_id": int(results[lo]["test_id"]),
            "max": float(v[hi]), "max_test_id": int(results[hi]["test_id"]),
            "rises": int((v > 0).sum())}


# published linear datamodeling scores (Park et al. 2023, "TRAK", their Figure 1 and Table), the
# scale a user reads ours against: (what was measured, LDS as text, its value for the bar's tick)
LDS_REFERENCES = (
    ("TRAK, CIFAR-10 ResNet-9, an ensemble of many checkpoints", "≈ 0.54", 0.54),
    ("TRAK, CIFAR-10 ResNet-9, one checkpoint", "≈ 0.1", 0.1),
    ("influence functions (LiSSA, Arnoldi), CIFAR-10 ResNet-9", "≈ 0.02–0.05", 0.035),
    ("logistic regression on MNIST", "≈ 0.8", 0.8),
)
RETRAINING_TEXT = {"scratch": "from scratch", "warm": "warm-started from θ̂", "convex": "to the optimum"}
CONVEX_MODELS = ("logreg", "svm")


def _pct(v: float) -> float:
    """A value on the LDS bar's scale, 0..1, as a percentage of its width (clipped)."""
    return round(100.0 * min(1.0, max(0.0, v)), 2)


def lds_view(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How the overview shows the saved LDS results (:meth:`Dashboard.lds_results`): one row per
    result, best first (undefined LDS last), with its interval as text and as a bar on a 0..1
    scale (``left``/``width``/``mean`` in percent; values below 0 drawn at 0) and the published
    reference values as ticks on the same scale."""
    rows = []
    for r in results:
        lo, hi = r["ci95"]
        defined = r["lds"] is not None and lo is not None and hi is not None
        rows.append({**r, "defined": defined, "n_tests": len(r["test_ids"]),
                     "retraining_text": RETRAINING_TEXT["convex" if r.get("model") in CONVEX_MODELS
                                                        else r["retraining"]],
                     "bar": {"left": _pct(lo), "width": max(0.5, _pct(hi) - _pct(lo)),
                             "mean": _pct(r["lds"])} if defined else None})
    rows.sort(key=lambda r: (not r["defined"], -(r["lds"] or 0.0)))
    return {"rows": rows, "best": rows[0] if rows and rows[0]["defined"] else None,
            "references": [{"what": w, "text": t, "at": _pct(v)} for w, t, v in LDS_REFERENCES]}


def reliability_view(rel: Mapping[str, Any]) -> dict[str, Any]:
    """The overview's reliability panel beyond the trust check (:meth:`Dashboard.reliability`):
    the LDS rows, the mislabel scores with their recall columns, and the brittleness summary."""
    mislabel = rel.get("mislabel")
    recall_at = sorted({p for s in mislabel["scores"] for p in s["recall"]}, key=float) if mislabel else []
    return {"lds": lds_view(rel.get("lds") or []), "mislabel": mislabel, "recall_at": recall_at,
            "brittleness": rel.get("brittleness"), "label_noise": rel.get("label_noise") or {},
            "commands": rel.get("commands") or {}, "errors": rel.get("errors") or {}}
