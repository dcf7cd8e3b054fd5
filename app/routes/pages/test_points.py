"""The test-point pages: the filtered gallery and one test point explained."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from ... import viz
from ...deps import DashDep
from ...limits import DEFAULT_LIMIT, DEFAULT_TOP
from ...views import trust_badge
from ..params import PageBool, PageConfidence, PageIhvp, PageInt, PageLimit, PageOffset, PageTop
from .base import page_router, render, url

router = page_router()


@router.get("/test-points", response_class=HTMLResponse)
def test_points(request: Request, dash: DashDep, label: PageInt = None, predicted: PageInt = None,
                misclassified: PageBool = None, min_confidence: PageConfidence = None,
                max_confidence: PageConfidence = None, offset: PageOffset = None,
                limit: PageLimit = None) -> Response:
    """Gallery of test points, filtered and paged by the query parameters."""
    offset, limit = offset or 0, limit or DEFAULT_LIMIT
    filters = {"label": label, "predicted": predicted, "misclassified": misclassified,
               "min_confidence": min_confidence, "max_confidence": max_confidence}
    page = dash.test_points(offset=offset, limit=limit, **filters)
    prev_url = (url("/test-points", **filters, offset=max(0, offset - limit), limit=limit)
                if offset > 0 else None)
    next_url = (url("/test-points", **filters, offset=offset + limit, limit=limit)
                if offset + limit < page["total"] else None)
    return render(request, "test_points.html", {
        "page": page, "filters": filters, "class_names": dash.class_names,
        "prev_url": prev_url, "next_url": next_url})


@router.get("/test-points/{test_id}", response_class=HTMLResponse)
def test_point(request: Request, test_id: int, dash: DashDep, top: PageTop = None,
               ihvp: PageIhvp = None) -> Response:
    """One test point: prediction, top-k helpful and harmful training points, score distribution."""
    top = top or DEFAULT_TOP
    point = dash.test_point(test_id)
    influence = dash.test_point_influence(test_id, top=top, ihvp=ihvp)
    scores = dash.test_point_scores(test_id, ihvp=ihvp)
    names = dash.class_names
    train_url = url("/train-points/{id}", ihvp=ihvp)  # formatted per marker by viz
    figures = {
        "probabilities": viz.probability_bars(point["probabilities"], names,
                                              predicted=point["predicted"], label=point["label"]),
        "histogram": viz.score_histogram(
            scores["scores"], helpful_ids=[r["train_id"] for r in influence["helpful"]],
            harmful_ids=[r["train_id"] for r in influence["harmful"]], train_url=train_url),
        "by_class": viz.class_sum_bars(scores["by_class"], names),
    }
    return render(request, "test_point.html", {
        "point": point, "influence": influence, "by_class": scores["by_class"],
        "figures": figures, "top": top, "ihvp": ihvp, "method": scores["ihvp"],
        "methods": dash.methods, "class_names": names,
        "trust_view": trust_badge(dash, scores["ihvp"])})
