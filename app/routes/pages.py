"""HTML pages (server-rendered Jinja2; figures drawn by Plotly from the local bundle)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from ..deps import DashDep

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, dash: DashDep) -> Response:
    """Overview of the run."""
    return request.app.state.templates.TemplateResponse(request, "index.html",
                                                        {"summary": dash.summary()})
