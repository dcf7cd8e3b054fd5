"""The overview page: the run at a glance and its reliability checks (leave-one-out trust, LDS,
mislabel detection, brittleness)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from ... import viz
from ...deps import DashDep
from ...limits import DEFAULT_LDS_TESTS
from ...views import reliability_view, trust_view
from ..params import PageIhvp
from .base import page_router, render

router = page_router()


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, dash: DashDep, ihvp: PageIhvp = None) -> Response:
    """Overview of the run: data, model, accuracy, confusion matrix, IHVP method and diagnostics."""
    summary = dash.summary(ihvp)
    fig = viz.confusion_heatmap(summary["confusion"], summary["class_names"])
    reliability = dash.reliability()
    trust = reliability["trust"]
    return render(request, "overview.html", {
        "summary": summary, "confusion_fig": fig, "ihvp": ihvp, "methods": dash.methods,
        "trust": trust, "trust_view": trust_view(trust, method=summary["ihvp_report"]["method"],
                                                 damping=summary["damping"]),
        "reliability": reliability, "rv": reliability_view(reliability),
        "lds_defaults": {"subsets": 30, "tests": min(DEFAULT_LDS_TESTS, dash.run.n_test)}})
