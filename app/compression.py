"""Compressed responses: starlette's :class:`GZipMiddleware` for every response of at least
``GZIP_MIN_SIZE`` bytes whose client accepts gzip (pages, JSON, the Plotly bundle, scripts).

Starlette's responder forwards only the response messages it knows, so the
``http.response.debug`` message through which a template response tells the test client its
template and context would be lost; :class:`GZip` hands that one message past the compressor."""

from __future__ import annotations

from starlette.middleware.gzip import GZipMiddleware

from .limits import ASGIApp, Message, Receive, Scope, Send

__all__ = ["GZIP_LEVEL", "GZIP_MIN_SIZE", "GZip"]

GZIP_MIN_SIZE = 1000  # bytes: smaller responses go out as they are
GZIP_LEVEL = 6  # zlib's default: most of level 9's gain for a fraction of its time


class GZip:
    """``GZipMiddleware(app, minimum_size, compresslevel)`` that keeps template debug info."""

    def __init__(self, app: ASGIApp, *, minimum_size: int = GZIP_MIN_SIZE,
                 compresslevel: int = GZIP_LEVEL) -> None:
        self.app = app
        self.minimum_size = minimum_size
        self.compresslevel = compresslevel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def inner(scope: Scope, receive: Receive, compress: Send) -> None:
            async def route(message: Message) -> None:
                await (send if message["type"] == "http.response.debug" else compress)(message)

            await self.app(scope, receive, route)

        gzip = GZipMiddleware(inner, minimum_size=self.minimum_size, compresslevel=self.compresslevel)
        await gzip(scope, receive, send)
