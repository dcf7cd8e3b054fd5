"""The upload page: explain an image the user drops in, as ``POST /api/v1/query`` would."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import File, Request, UploadFile
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from engine import InfluenceError

from ... import viz
from ...deps import DashDep, SettingsDep
from ...errors import error_detail, error_status
from ...images import UploadError
from ...limits import DEFAULT_TOP
from ...services import Dashboard
from ...views import trust_badge
from ..params import FormBool, FormIhvp, FormInt, FormTop
from .base import page_router, render

router = page_router()


def _context(dash: Dashboard, *, top: int, ihvp: str | None, label: int | None,
             invert: bool) -> dict[str, Any]:
    return {"result": None, "error": None, "top": top, "ihvp": ihvp, "label": label,
            "invert": invert, "methods": dash.methods, "class_names": dash.class_names,
            "probabilities_fig": None, "trust_view": None}


@router.get("/query", response_class=HTMLResponse)
def query_form(request: Request, dash: DashDep) -> Response:
    """Upload an image (drop zone or file picker) to explain it."""
    return render(request, "query.html",
                  _context(dash, top=DEFAULT_TOP, ihvp=None, label=None, invert=False))


@router.post("/query", response_class=HTMLResponse)
async def query_result(
    request: Request,
    dash: DashDep,
    settings: SettingsDep,
    file: Annotated[UploadFile | None, File()] = None,
    top: FormTop = None,
    ihvp: FormIhvp = None,
    label: FormInt = None,
    invert: FormBool = False,
) -> Response:
    """The uploaded image explained, as ``POST /api/v1/query`` would answer, rendered as a page."""
    top = top or DEFAULT_TOP
    ctx = _context(dash, top=top, ihvp=ihvp, label=label, invert=invert)
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
    ctx["trust_view"] = trust_badge(dash, result["ihvp"]["method"])
    return render(request, "query.html", ctx)
