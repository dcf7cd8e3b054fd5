"""HTML pages (server-rendered Jinja2; figures built in :mod:`app.viz`, drawn by Plotly from the
local bundle).

Every number comes from :class:`app.services.Dashboard`, the same calls the REST API makes, and
every view has a URL that reproduces it (its filters, IHVP method and top-k are query
parameters; the group page's retraining check too). An error on a page is an HTML error page
with its 4xx status, never JSON or a 500.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Mapping, Sequence
from http import HTTPStatus
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from pydantic import BeforeValidator, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from engine import InfluenceError, QueryError

from .. import security, viz
from ..deps import DashDep, SettingsDep
from ..errors import error_detail, error_status
from ..images import UploadError
from ..services import DEFAULT_LIMIT, DEFAULT_TOP, MAX_LIMIT, MAX_TOP, Dashboard, check_index

__all__ = ["PageRoute", "router", "trust_view"]


def _blank(value: Any) -> Any:
    """An empty form field means 'not given' (HTML forms send ``label=`` for an unset filter)."""
    return None if isinstance(value, str) and not value.strip() else value


# constraints sit on the inner type: they apply to a given value, after a blank became None
OptInt = Annotated[int | None, BeforeValidator(_blank), Query()]
OptBool = Annotated[bool | None, BeforeValidator(_blank), Query()]
Confidence = Annotated[Annotated[float, Field(ge=0.0, le=1.0)] | None, BeforeValidator(_blank), Query()]
TopK = Annotated[int, Field(ge=1, le=MAX_TOP)]
Top = Annotated[TopK | None, BeforeValidator(_blank), Query()]
Offset = Annotated[Annotated[int, Field(ge=0)] | None, BeforeValidator(_blank), Query()]
Limit = Annotated[Annotated[int, Field(ge=1, le=MAX_LIMIT)] | None, BeforeValidator(_blank), Query()]
Ihvp = Annotated[str | None, BeforeValidator(_blank), Query()]
RankBy = Annotated[Literal["self_influence", "loss", "grad_norm"] | None, BeforeValidator(_blank), Query()]
GroupBy = Annotated[Literal["class", "mislabels", "cluster", "ids"] | None, BeforeValidator(_blank),
                    Query()]
Fraction = Annotated[Annotated[float, Field(gt=0.0, le=1.0)] | None, BeforeValidator(_blank), Query()]
GroupTop = Annotated[Annotated[int, Field(ge=1, le=100_000)] | None, BeforeValidator(_blank), Query()]
Clusters = Annotated[Annotated[int, Field(ge=2, le=100)] | None, BeforeValidator(_blank), Query()]
Order = Annotated[Annotated[int, Field(ge=1, le=2)] | None, BeforeValidator(_blank), Query()]
IdList = Annotated[Annotated[str, Field(max_length=200_000)] | None, BeforeValidator(_blank), Query()]

# the trust badge: Pearson of predicted vs actual retraining at or above GOOD is green, at or
# above FAIR amber, below it red; a noise floor above NOISY × mean |actual change| is flagged
TRUST_GOOD, TRUST_FAIR, TRUST_NOISY = 0.9, 0.7, 0.2
GROUP_THUMBS = 48  # training images shown on the group page
DEFAULT_CLUSTERS = 8  # k-means centres when a cluster group names none
AUDIT_MAX_TRAIN, AUDIT_MAX_TESTS = 100_000, 1_000  # a group audit item's limits (app/audits/schemas.py)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "path", "body")]
        parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def render(request: Request, name: str, context: Mapping[str, Any], *,
           status_code: int = 200) -> Response:
    """``templates/name`` with ``context`` (kept on the response for tests) and the run's header."""
    dash = getattr(request.app.state, "dashboard", None)
    ctx = {"run_info": dash.health() if dash is not None else None, **context}
    return request.app.state.templates.TemplateResponse(request, name, ctx, status_code=status_code)


def error_page(request: Request, status_code: int, detail: str) -> Response:
    """The HTML error page, with the given 4xx status."""
    try:
        title = HTTPStatus(status_code).phrase
    except ValueError:
        title = "Error"
    return render(request, "error.html", {"status": status_code, "title": title, "detail": detail},
                  status_code=status_code)


class PageRoute(APIRoute):
    """A page route: bad parameters, unknown ids and engine errors become :func:`error_page`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return error_page(request, 422, _validation_detail(exc))
            except HTTPException as exc:
                return error_page(request, exc.status_code, str(exc.detail))
            except (InfluenceError, UploadError) as exc:
                return error_page(request, error_status(exc), error_detail(exc))

        return page_handler


router = APIRouter(include_in_schema=False, route_class=PageRoute)


def url(path: str, **params: Any) -> str:
    """``path`` with the given query parameters, leaving out those that are ``None``."""
    query = urlencode({k: str(v).lower() if isinstance(v, bool) else v
                       for k, v in params.items() if v is not None})
    return f"{path}?{query}" if query else path


# ---------------------------------------------------------------------------------- overview
@router.get("/", response_class=HTMLResponse)
def overview(request: Request, dash: DashDep, ihvp: Ihvp = None) -> Response:
    """Overview of the run: data, model, accuracy, confusion matrix, IHVP method and diagnostics."""
    summary = dash.summary(ihvp)
    fig = viz.confusion_heatmap(summary["confusion"], summary["class_names"])
    trust = dash.trust()
    return render(request, "overview.html", {
        "summary": summary, "confusion_fig": fig, "ihvp": ihvp, "methods": dash.methods,
        "trust": trust, "trust_view": trust_view(trust, method=summary["ihvp_report"]["method"],
                                                 damping=summary["damping"])})


# ---------------------------------------------------------------------------------- trust
def _trust_level(pearson: float) -> str:
    return "good" if pearson >= TRUST_GOOD else "fair" if pearson >= TRUST_FAIR else "poor"


def trust_view(trust: Mapping[str, Any], *, method: str | None = None,
               damping: float | None = None) -> dict[str, Any]:
    """How a page shows the run's trust check (:meth:`Dashboard.trust`): the result row for the
    page's IHVP method and damping (the best row when that one was not checked), its level
    (``good``/``fair``/``poor`` by Pearson, ``unchecked``, or ``failed`` when every row is an
    error), whether the noise floor is too close to the signal, and every row with its level."""
    if not trust.get("checked"):
        return {"level": "unchecked", "how": trust.get("how", "influence trust --run RUN")}
    rows = [{**r, "level": _trust_level(r["pearson"]) if "pearson" in r else "error"}
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


def _trust_badge(dash: Dashboard, method: str) -> dict[str, Any]:
    """The trust badge of a detail page whose scores come from ``method`` at the run's damping."""
    return trust_view(dash.trust(), method=method, damping=dash.run.config.damping)


# ---------------------------------------------------------------------------------- test points
@router.get("/test-points", response_class=HTMLResponse)
def test_points(request: Request, dash: DashDep, label: OptInt = None, predicted: OptInt = None,
                misclassified: OptBool = None, min_confidence: Confidence = None,
                max_confidence: Confidence = None, offset: Offset = None,
                limit: Limit = None) -> Response:
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
def test_point(request: Request, test_id: int, dash: DashDep, top: Top = None,
               ihvp: Ihvp = None) -> Response:
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
        "trust_view": _trust_badge(dash, scores["ihvp"])})


# ---------------------------------------------------------------------------------- training points
@router.get("/train-points/{train_id}", response_class=HTMLResponse)
def train_point(request: Request, train_id: int, dash: DashDep, top: Top = None,
                ihvp: Ihvp = None) -> Response:
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
        "trust_view": _trust_badge(dash, point["ihvp"])})


@router.get("/mislabels", response_class=HTMLResponse)
def mislabels(request: Request, dash: DashDep, offset: Offset = None, limit: Limit = None,
              ihvp: Ihvp = None, by: RankBy = None) -> Response:
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
                 for key in ("self_influence", "loss", "grad_norm")}
    return render(request, "mislabels.html", {
        "ranking": ranking, "ihvp": ihvp, "methods": dash.methods, "limit": limit,
        "by": ranking["by"], "rank_urls": rank_urls,
        "class_names": dash.class_names, "prev_url": prev_url, "next_url": next_url})


# ---------------------------------------------------------------------------------- upload
def _query_context(dash: Dashboard, *, top: int, ihvp: str | None, label: int | None,
                   invert: bool) -> dict[str, Any]:
    return {"result": None, "error": None, "top": top, "ihvp": ihvp, "label": label,
            "invert": invert, "methods": dash.methods, "class_names": dash.class_names,
            "probabilities_fig": None, "trust_view": None}


@router.get("/query", response_class=HTMLResponse)
def query_form(request: Request, dash: DashDep) -> Response:
    """Upload an image (drop zone or file picker) to explain it."""
    return render(request, "query.html",
                  _query_context(dash, top=DEFAULT_TOP, ihvp=None, label=None, invert=False))


@router.post("/query", response_class=HTMLResponse)
async def query_result(
    request: Request,
    dash: DashDep,
    settings: SettingsDep,
    file: Annotated[UploadFile | None, File()] = None,
    top: Annotated[TopK | None, BeforeValidator(_blank), Form()] = None,
    ihvp: Annotated[str | None, BeforeValidator(_blank), Form()] = None,
    label: Annotated[int | None, BeforeValidator(_blank), Form()] = None,
    invert: Annotated[bool, Form()] = False,
) -> Response:
    """The uploaded image explained, as ``POST /api/v1/query`` would answer, rendered as a page."""
    top = top or DEFAULT_TOP
    ctx = _query_context(dash, top=top, ihvp=ihvp, label=label, invert=invert)
    try:
        if file is None or not file.filename:
            raise UploadError(400, "choose a PNG or JPEG image to upload")
        data = await file.read(settings.upload_limit + 1)
        result = await run_in_threadpool(dash.query, data, max_bytes=settings.upload_limit,
                                         top=top, ihvp=ihvp, label=label, invert=invert)
    except (UploadError, InfluenceError) as exc:
        ctx["error"] = error_detail(exc)
        return render(request, "query.html", ctx, status_code=error_status(exc))
    ctx["result"] = result
    ctx["filename"] = file.filename
    ctx["probabilities_fig"] = viz.probability_bars(result["probabilities"], dash.class_names,
                                                    predicted=result["predicted"], label=label)
    ctx["trust_view"] = _trust_badge(dash, result["ihvp"]["method"])
    return render(request, "query.html", ctx)


# ---------------------------------------------------------------------------------- groups
def parse_ids(text: str, what: str) -> list[int]:
    """Integers separated by commas or spaces (``"3, 8,21"``)."""
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise QueryError(f"{what} must be integers separated by commas, got {text!r}") from None


def change_summary(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The service's predicted test-loss changes of one order, read off for the page's table:
    their mean and mean magnitude, and the largest fall and rise with their test points."""
    v = np.array([r["predicted_loss_change"] for r in results], dtype=np.float64)
    lo, hi = int(v.argmin()), int(v.argmax())
    return {"n": int(v.size), "mean": float(v.mean()), "mean_abs": float(np.abs(v).mean()),
            "min": float(v[lo]), "min_test_id": int(results[lo]["test_id"]),
            "max": float(v[hi]), "max_test_id": int(results[hi]["test_id"]),
            "rises": int((v > 0).sum())}


def _group_members(dash: Dashboard, by: str, *, label: int | None, fraction: float | None,
                   top: int | None, clusters: int | None, cluster: int | None,
                   ids: str | None) -> dict[str, Any]:
    if by != "ids":
        return dash.group_members(by=by, label=label, fraction=fraction or 1.0, top=top,
                                  clusters=clusters or DEFAULT_CLUSTERS, cluster=cluster)
    if not ids:
        raise QueryError("a group by ids needs ids, e.g. 3, 8, 21")
    chosen = list(dict.fromkeys(parse_ids(ids, "ids")))  # a repeated id counts once
    for i in chosen:
        check_index(i, dash.run.n_train, "train")
    return {"by": "ids", "train_ids": chosen, "size": len(chosen)}


@router.get("/groups", response_class=HTMLResponse)
def groups(request: Request, dash: DashDep, by: GroupBy = None, label: OptInt = None,
           fraction: Fraction = None, top: GroupTop = None, clusters: Clusters = None,
           cluster: OptInt = None, ids: IdList = None, test_ids: IdList = None, order: Order = None,
           ihvp: Ihvp = None, check: OptBool = None) -> Response:
    """Group influence: a group of training points (by class, the mislabel ranking, a k-means
    cluster or explicit ids), the predicted change of chosen test losses when it is removed
    (orders 1 and 2; ``order`` sorts the plot and goes into an audit item), and with ``check=1``
    both orders against actually retraining without it."""
    order = order or 1
    form = {"by": by, "label": label, "fraction": fraction, "top": top, "clusters": clusters,
            "cluster": cluster, "ids": ids, "test_ids": test_ids, "order": order, "ihvp": ihvp}
    ctx: dict[str, Any] = {
        "form": form, "class_names": dash.class_names, "methods": dash.methods, "error": None,
        "members": None, "results": {}, "summaries": {}, "order_errors": {}, "figures": {},
        "checked": None, "check_error": None, "check_url": None, "members_url": None, "audit": None,
        "thumbs": GROUP_THUMBS, "default_clusters": DEFAULT_CLUSTERS}
    if by is None:
        return render(request, "groups.html", ctx)
    try:
        members = _group_members(dash, by, label=label, fraction=fraction, top=top,
                                 clusters=clusters, cluster=cluster, ids=ids)
        tests = (parse_ids(test_ids, "test_ids") if test_ids
                 else list(range(dash.health()["n_test"])))
        ctx["results"][order] = dash.group(members["train_ids"], tests, order=order, ihvp=ihvp)
    except InfluenceError as exc:
        ctx["error"] = error_detail(exc)
        return render(request, "groups.html", ctx, status_code=error_status(exc))
    other = 3 - order
    try:  # the other order beside it (order 2 is refused on projected runs: say why)
        ctx["results"][other] = dash.group(members["train_ids"], tests, order=other, ihvp=ihvp)
    except QueryError as exc:
        ctx["order_errors"][other] = error_detail(exc)
    ctx["results"] = dict(sorted(ctx["results"].items()))
    test_url = url("/test-points/{id}", ihvp=ihvp)  # formatted per point by the figures
    ctx.update(members=members,
               summaries={o: change_summary(r["results"]) for o, r in ctx["results"].items()},
               check_url=url("/groups", **form, check=1),
               members_url=None if by == "ids" else url(
                   "/api/v1/groups", by=by, label=label, fraction=fraction, top=top,
                   clusters=clusters, cluster=cluster),
               audit={"train_ids": members["train_ids"] if len(members["train_ids"]) <= AUDIT_MAX_TRAIN
                      else None, "test_ids": tests[:AUDIT_MAX_TESTS], "n_tests": len(tests)})
    ctx["figures"]["changes"] = viz.group_changes(
        {o: r["results"] for o, r in ctx["results"].items()}, sort_order=order, test_url=test_url)
    if check and security.api_key(request.app.state.settings):  # a page link cannot carry the key
        ctx["check_error"] = ("this server retrains only for requests that carry its API key: "
                              "POST /api/v1/group-influence/check with 'Authorization: Bearer <key>'")
    elif check:
        try:
            ctx["checked"] = dash.group_check(members["train_ids"], tests, ihvp=ihvp)
        except InfluenceError as exc:  # e.g. a network too large to retrain here
            ctx["check_error"] = error_detail(exc)
        else:
            ctx["figures"]["check"] = viz.group_check_scatter(ctx["checked"]["results"],
                                                              test_url=test_url)
    return render(request, "groups.html", ctx)
