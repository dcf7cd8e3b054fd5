"""HTML pages (server-rendered Jinja2; figures built in :mod:`app.viz`, drawn by Plotly from the
local bundle).

Every number comes from :class:`app.services.Dashboard`, the same calls the REST API makes, and
every view has a URL that reproduces it (its filters, IHVP method and top-k are query
parameters). An error on a page is an HTML error page with its 4xx status, never JSON or a 500.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from http import HTTPStatus
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from pydantic import BeforeValidator, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from engine import InfluenceError

from .. import viz
from ..deps import DashDep, SettingsDep
from ..errors import error_detail, error_status
from ..images import UploadError
from ..services import DEFAULT_LIMIT, DEFAULT_TOP, MAX_LIMIT, MAX_TOP, Dashboard

__all__ = ["PageRoute", "router"]


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
    return render(request, "overview.html", {"summary": summary, "confusion_fig": fig,
                                             "ihvp": ihvp, "methods": dash.methods})


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
        "methods": dash.methods, "class_names": names})


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
    return render(request, "train_point.html", {
        "point": point, "influence": influence, "probabilities_fig": fig, "top": top,
        "ranking_url": url("/mislabels", offset=page_offset, ihvp=ihvp),
        "ihvp": ihvp, "method": point["ihvp"], "methods": dash.methods,
        "class_names": dash.class_names})


@router.get("/mislabels", response_class=HTMLResponse)
def mislabels(request: Request, dash: DashDep, offset: Offset = None, limit: Limit = None,
              ihvp: Ihvp = None) -> Response:
    """Training points ranked by |self-influence|: the likely mislabelled first."""
    offset, limit = offset or 0, limit or DEFAULT_LIMIT
    ranking = dash.self_influence_ranking(top=limit, offset=offset, ihvp=ihvp)
    prev_url = url("/mislabels", offset=max(0, offset - limit), limit=limit, ihvp=ihvp) if offset else None
    next_url = (url("/mislabels", offset=offset + limit, limit=limit, ihvp=ihvp)
                if offset + limit < ranking["total"] else None)
    return render(request, "mislabels.html", {
        "ranking": ranking, "ihvp": ihvp, "methods": dash.methods, "limit": limit,
        "class_names": dash.class_names, "prev_url": prev_url, "next_url": next_url})


# ---------------------------------------------------------------------------------- upload
def _query_context(dash: Dashboard, *, top: int, ihvp: str | None, label: int | None,
                   invert: bool) -> dict[str, Any]:
    return {"result": None, "error": None, "top": top, "ihvp": ihvp, "label": label,
            "invert": invert, "methods": dash.methods, "class_names": dash.class_names,
            "probabilities_fig": None}


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
    return render(request, "query.html", ctx)
