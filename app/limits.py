"""Every size limit of the web layer, defined once (pages, schemas, routes and the templates,
through the ``limits`` template global, import them from here), and the middleware that enforces
the body limits while a request streams in.

A size limit on request bodies is enforced while they stream in (an ASGI middleware):
FastAPI parses a multipart form, spooling its files to disk, before a route handler runs, so a
limit checked in the handler comes after the whole body was read. :class:`BodyLimit` refuses a body
before that: at once when ``Content-Length`` declares too much, else as soon as the bytes received
pass the limit (a chunked body without ``Content-Length``, or one that sends more than it declared),
so no more than the limit plus one chunk is ever read. Uploads (``POST /api/v1/query`` and the
page's ``POST /query``) are limited to the configured upload size plus the form's framing; every
other body (JSON) to ``MAX_JSON_BODY``. The answer is ``413`` with a JSON ``detail``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

__all__ = [
    "AUDIT_MAX_TESTS",
    "AUDIT_MAX_TRAIN",
    "DEFAULT_CLUSTERS",
    "DEFAULT_LDS_TESTS",
    "DEFAULT_LIMIT",
    "DEFAULT_TOP",
    "DEFAULT_UPLOAD_LIMIT",
    "MAX_BRITTLE_K",
    "MAX_BRITTLE_TESTS",
    "MAX_CHECK_TESTS",
    "MAX_CLUSTERS",
    "MAX_FASTIF",
    "MAX_GROUP_TESTS",
    "MAX_GROUP_TOP",
    "MAX_GROUP_TRAIN",
    "MAX_ID_TEXT",
    "MAX_ITEMS",
    "MAX_ITEM_TOP",
    "MAX_JSON_BODY",
    "MAX_LDS_SUBSETS",
    "MAX_LDS_TESTS",
    "MAX_LIMIT",
    "MAX_NOTE",
    "MAX_POOL",
    "MAX_TITLE",
    "MAX_TOP",
    "MULTIPART_OVERHEAD",
    "UPLOAD_PATHS",
    "ASGIApp",
    "BodyLimit",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "template_limits",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# lists and pages (app/services.py checks the same bounds)
DEFAULT_TOP, MAX_TOP = 10, 500  # entries per helpful/harmful list
DEFAULT_LIMIT, MAX_LIMIT = 50, 1000  # entries per page of a listing
MAX_FASTIF, MAX_POOL = 1_000_000, 100_000  # FastIF's nearest points, and its gradient-norm pool
# groups
MAX_GROUP_TRAIN = 1_000_000  # training ids in one group
MAX_GROUP_TESTS = 100_000  # test ids one group-influence request measures
MAX_CHECK_TESTS = 10_000  # test ids one retraining check measures
MAX_GROUP_TOP = 100_000  # a mislabel group's size
DEFAULT_CLUSTERS, MAX_CLUSTERS = 8, 100  # k-means centres of a cluster group
MAX_ID_TEXT = 200_000  # characters of a page's typed id list
# reliability jobs (each retrains: a subset or a k is one model trained)
MAX_LDS_SUBSETS = 500  # LDS subsets M (retrained models) of one job
MAX_LDS_TESTS = 10_000  # LDS test points of one job
DEFAULT_LDS_TESTS = 100  # LDS test points when none are named (or every one, when a run has fewer)
MAX_BRITTLE_TESTS = 50  # test points one brittleness job searches
MAX_BRITTLE_K = 10_000  # the largest k (top helpful points removed) a brittleness search tries
# audits
MAX_ITEMS = 500  # items per request
MAX_NOTE = 10_000  # characters of a note or description
MAX_TITLE = 200  # characters of a title
MAX_ITEM_TOP = 100  # entries per list a test-point item snapshots
AUDIT_MAX_TRAIN, AUDIT_MAX_TESTS = 100_000, 1_000  # a group item's training and test ids
# request bodies
DEFAULT_UPLOAD_LIMIT = 5 * 1024 * 1024  # bytes (``Settings.upload_limit``)
UPLOAD_PATHS = frozenset({"/api/v1/query", "/query"})
MULTIPART_OVERHEAD = 64 * 1024  # bytes of form framing allowed beyond the upload limit
MAX_JSON_BODY = 32 * 1024 * 1024  # a group of a million training ids is about 8 MB of JSON


def template_limits() -> dict[str, int]:
    """The limits by name, for the templates' ``limits`` global (``max="{{ limits.MAX_TOP }}"``)."""
    return {name: value for name, value in globals().items()
            if name.isupper() and isinstance(value, int) and not isinstance(value, bool)}


class _TooLarge(HTTPException):
    """The body passed the limit while streaming in: an HTTP error, so that FastAPI's body
    parsing re-raises it (it turns other errors into 400) and the app's handler answers 413."""

    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


class BodyLimit:
    """Answer ``413`` to a request whose body is larger than its route's limit, reading no more
    of it than the limit (plus the chunk that crossed it)."""

    def __init__(self, app: ASGIApp, *, upload_limit: int, json_limit: int = MAX_JSON_BODY) -> None:
        self.app = app
        self.upload_limit = upload_limit
        self.json_limit = json_limit

    def _limit(self, scope: Scope) -> tuple[int, str]:
        if scope["path"] in UPLOAD_PATHS:
            rule = f"uploads are limited to {self.upload_limit:,} bytes"
            return self.upload_limit + MULTIPART_OVERHEAD, rule
        return self.json_limit, f"request bodies are limited to {self.json_limit:,} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, rule = self._limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, f"the request body is {declared:,} bytes; {rule}")
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge(f"the request body is more than {limit:,} bytes; {rule}")
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge as exc:  # read outside the app's exception handling
            if started:
                raise
            await _refuse(send, exc.detail)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _refuse(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
