"""Who may change what, and what a browser is told: the API-key guard for write routes, CORS,
and the security headers every response carries.

- **Writes**: when the server has an API key (``INFLUENCE_API_KEY``), routes that create state
  or start retraining jobs (``POST /api/v1/audits``, ``POST /api/v1/attacks``,
  ``POST /api/v1/group-influence/check``, and the group page's retraining check) need
  ``Authorization: Bearer <key>`` (the guard is :data:`app.deps.WriterDep`, built on the helpers
  here); an existing audit is edited with its own edit token or the key
  (``app/audits/store.authorize``). Without a key (the single-user default on loopback) they are
  open. Reading never needs a key.
- **CORS**: none unless ``INFLUENCE_CORS_ORIGINS`` names origins; credentials are never allowed
  (tokens travel in a header the caller sets, not in cookies).
- **Headers**: a strict Content-Security-Policy (scripts only from this server, or inline with the
  per-request nonce the templates put on their one inline script), no framing, no referrer (a
  permalink is a capability: it must not leak to other sites through ``Referer``), no MIME
  sniffing, and ``Cache-Control: no-store`` on the audit routes.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.middleware.cors import CORSMiddleware

from .limits import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Authorization", "SecurityHeaders", "api_key", "bearer", "carries_api_key", "csp_nonce",
           "install_security"]

Authorization = Annotated[str | None, Header(description="Bearer <edit token or API key>")]


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None for anything else)."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def api_key(settings: Any) -> str | None:
    return settings.api_key.get_secret_value() if settings.api_key else None


def carries_api_key(settings: Any, authorization: str | None) -> bool:
    """Whether the server has an API key and the header carries it (compared in constant time)."""
    key, token = api_key(settings), bearer(authorization)
    return key is not None and token is not None and hmac.compare_digest(token.encode(), key.encode())


def csp_nonce(request: Request) -> str:
    """The nonce that lets a template's inline script run under this response's CSP."""
    return request.scope.get("state", {}).get("csp_nonce", "")


def _policy(nonce: str) -> str:
    return "; ".join([
        "default-src 'self'",
        f"script-src 'self' 'nonce-{nonce}'",
        "style-src 'self' 'unsafe-inline'",  # Plotly sets style attributes and injects a sheet
        "img-src 'self' data: blob:",  # audits keep their images as data URLs; upload previews
        "connect-src 'self'",
        "font-src 'self' data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ])


NO_STORE_PREFIXES = ("/api/v1/audits", "/audits/")


class SecurityHeaders:
    """Pure ASGI middleware (streams untouched): adds the headers to every HTTP response and
    puts a fresh CSP nonce in ``request.state.csp_nonce``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(16)
        scope.setdefault("state", {})["csp_nonce"] = nonce
        no_store = scope["path"].startswith(NO_STORE_PREFIXES)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                extra = [
                    (b"content-security-policy", _policy(nonce).encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"cross-origin-resource-policy", b"same-origin"),
                    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
                ]
                if no_store:
                    extra.append((b"cache-control", b"no-store"))
                headers += [(k, v) for k, v in extra if k not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_security(app: FastAPI, *, cors_origins: list[str]) -> None:
    """CORS for the named origins only (none by default), then the headers (outermost, so error
    responses and CORS preflights carry them too)."""
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "PATCH", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(SecurityHeaders)
