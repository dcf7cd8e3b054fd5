"""Wiring of the web app: settings -> run (opened once) -> routers, templates, static files, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

import engine
from app.api import error_status, pages, router
from app.settings import Settings

__all__ = ["create_app", "serve", "ROOT", "TEMPLATES_DIR", "STATIC_DIR"]

ROOT = Path(__file__).resolve().parent.parent  # the repository root (parent of app/)
TEMPLATES_DIR = ROOT / "templates"
STATIC_DIR = ROOT / "static"


async def _influence_error(request: Request, exc: Exception) -> JSONResponse:
    """The one place where engine errors become HTTP errors (see :func:`app.api.error_status`)."""
    assert isinstance(exc, engine.InfluenceError)
    return JSONResponse({"detail": " ".join(str(exc).split())}, status_code=error_status(exc))


def create_app(settings: Settings) -> FastAPI:
    """The dashboard app for ``settings.run``; the run is opened once, when the app starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.run = engine.open_run(settings.run)
        yield

    app = FastAPI(title="influence-dashboard", version="0.1.0", lifespan=lifespan,
                  description="Influence functions for image classifiers (Koh & Liang 2017).")
    app.state.settings = settings
    app.state.templates = Jinja2Templates(directory=TEMPLATES_DIR)
    app.add_exception_handler(engine.InfluenceError, _influence_error)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)
    app.include_router(pages)
    return app


def serve(run_path: str | Path, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the dashboard for ``run_path`` with uvicorn (blocks until interrupted)."""
    import uvicorn

    settings = Settings(run=Path(run_path), host=host, port=port)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)
