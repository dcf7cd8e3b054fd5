"""The one place where domain errors become HTTP errors: JSON ``{"detail": ...}`` with a 4xx."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from engine import IndexOutOfRange, InfluenceError, QueryError

from .audits.db import DatabaseError
from .audits.store import AuditNotFound, Forbidden
from .images import UploadError
from .jobs import JobNotFound, QueueFull

__all__ = ["error_detail", "error_status", "install_error_handlers"]

BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400, which leaves out why


def error_status(exc: Exception) -> int:
    """HTTP status for a domain error: 404 for an index out of range or an unknown audit, 422 for
    another bad query, the upload's own status for a bad upload, 403 for a write without the
    right token, 503 when the audit database is unavailable, 400 for anything else."""
    if isinstance(exc, UploadError):
        return exc.status
    if isinstance(exc, (AuditNotFound, JobNotFound)):
        return 404
    if isinstance(exc, QueueFull):
        return 429
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, DatabaseError):
        return 503
    if isinstance(exc, IndexOutOfRange):
        return 404
    if isinstance(exc, QueryError):
        return 422
    return 400


def error_detail(exc: Exception) -> str:
    """The error's message on one line."""
    return " ".join(str(exc).split())


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": error_detail(exc)}, status_code=error_status(exc))


def _json_safe(value: Any) -> Any:
    """``value`` as JSON can carry it: non-finite floats (``1e400`` or ``NaN`` in a JSON body) as
    strings, lone surrogates (``"\\ud800"`` is valid JSON) as their escapes; echoed back as they
    were, in a 422, they would fail to encode."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 (``detail``: the list of what failed validation, and where), encodable
    whatever the request held."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return JSONResponse({"detail": _json_safe(jsonable_encoder(errors))}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's HTTP errors as JSON; a body FastAPI could not parse (not UTF-8, an integer of
    thousands of digits) says why."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR and exc.__cause__ is not None:
        exc = HTTPException(400, f"the request body could not be parsed: {error_detail(exc.__cause__)}")
    return await http_exception_handler(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(InfluenceError, _domain_error)
    for exc in (UploadError, AuditNotFound, Forbidden, DatabaseError, JobNotFound, QueueFull):
        app.add_exception_handler(exc, _domain_error)
