"""What every page shares: rendering a template with the run's header, the HTML error page, the
route class that turns errors into it, and permalink URLs."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from engine import InfluenceError

from ... import deps
from ...errors import error_detail, error_status
from ...images import UploadError

__all__ = ["PageRoute", "error_page", "page_router", "render", "url"]


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "path", "body")]
        parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def render(request: Request, name: str, context: Mapping[str, Any], *,
           status_code: int = 200) -> Response:
    """``templates/name`` with ``context`` (kept on the response for tests) and the run's header."""
    dash = deps.optional_dashboard(request)
    ctx = {"run_info": dash.health() if dash is not None else None, **context}
    return deps.get_templates(request).TemplateResponse(request, name, ctx, status_code=status_code)


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


def page_router() -> APIRouter:
    """A router of pages: left out of the OpenAPI schema, errors as HTML pages."""
    return APIRouter(include_in_schema=False, route_class=PageRoute)


def url(path: str, **params: Any) -> str:
    """``path`` with the given query parameters, leaving out those that are ``None``."""
    query = urlencode({k: str(v).lower() if isinstance(v, bool) else v
                       for k, v in params.items() if v is not None})
    return f"{path}?{query}" if query else path
