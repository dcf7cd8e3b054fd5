"""The training-point pages: one training point, and the ranking of likely mislabels."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from engine import QueryError

from ... import viz
from ...deps import DashDep
from ...errors import error_detail
from ...limits import DEFAULT_LIMIT, DEFAULT_TOP
from ...views import trust_badge
from ..params import PageIhvp, PageLimit, PageOffset, PageRankBy, PageTop
from .base import page_router, render, url

router = page_router()

RANKINGS = ("self_influence", "loss", "grad_norm")


@router.get("/train-points/{train_id}", response_class=HTMLResponse)
def train_point(request: Request, train_id: int, dash: DashDep, top: PageTop = None,
                ihvp: PageIhvp = None) -> Response:
    """One training point: label, prediction, self-influence and rank, the test points it moves most."""
    top = top or DEFAULT_TOP
    point = dash.train_point(train_id, ihvp=ihvp)
    influence = dash.train_point_influence(train_id, top=top, ihvp=ihvp)
    fig = viz.probability_bars(point["probabilities"], dash.class_names,
                               predicted=point["predicted"], label=point["label"])
    page_offset = (point["rank"] - 1) // DEFAULT_LIMIT * DEFAULT_LIMIT  # the ranking page it is on
    try:  # per-layer I_up,params: refused on projected runs, which store no full gradients
        params, params_error = dash.train_point_params(train_id, ihvp=ihvp), None
    except QueryError as exc:
        params, params_error = None, error_detail(exc)
    return render(request, "train_point.html", {
        "point": point, "influence": influence, "probabilities_fig": fig, "top": top,
        "ranking_url": url("/mislabels", offset=page_offset, ihvp=ihvp),
        "ihvp": ihvp, "method": point["ihvp"], "methods": dash.methods,
        "class_names": dash.class_names, "params": params, "params_error": params_error,
        "params_fig": viz.layer_share_bars(params["layers"]) if params else None,
        "trust_view": trust_badge(dash, point["ihvp"])})


@router.get("/mislabels", response_class=HTMLResponse)
def mislabels(request: Request, dash: DashDep, offset: PageOffset = None, limit: PageLimit = None,
              ihvp: PageIhvp = None, by: PageRankBy = None) -> Response:
    """Training points ranked by |self-influence| (the likely mislabelled first), or by a simple
    baseline (``by=loss``: training loss, ``by=grad_norm``: gradient norm)."""
    offset, limit = offset or 0, limit or DEFAULT_LIMIT
    ranking = dash.self_influence_ranking(top=limit, offset=offset, ihvp=ihvp,
                                          by=by or "self_influence")
    keep = None if by == "self_influence" else by  # the default ranking stays out of the URL
    prev_url = (url("/mislabels", offset=max(0, offset - limit), limit=limit, ihvp=ihvp, by=keep)
                if offset else None)
    next_url = (url("/mislabels", offset=offset + limit, limit=limit, ihvp=ihvp, by=keep)
                if offset + limit < ranking["total"] else None)
    # the switch between rankings starts each at its first page, keeping method and page size
    rank_urls = {key: url("/mislabels", limit=limit if limit != DEFAULT_LIMIT else None, ihvp=ihvp,
                          by=None if key == "self_influence" else key)
                 for key in RANKINGS}
    return render(request, "mislabels.html", {
        "ranking": ranking, "ihvp": ihvp, "methods": dash.methods, "limit": limit,
        "by": ranking["by"], "rank_urls": rank_urls,
        "class_names": dash.class_names, "prev_url": prev_url, "next_url": next_url})
