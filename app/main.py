"""Wiring of the web app: settings -> run (opened once) -> routers, templates, static files, errors,
compression and logging (uvicorn's format when served)."""

from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

import engine

from .audits.db import make_engine, migrate, session_factory
from .compression import GZip
from .errors import install_error_handlers
from .jobs import JobManager
from .limits import BodyLimit, template_limits
from .routes import assets, audits, images, jobs, meta, pages, quality, queries, test_points, train_points
from .security import csp_nonce, install_security
from .services import Dashboard
from .settings import Settings

__all__ = ["ROOT", "STATIC_DIR", "TEMPLATES_DIR", "create_app", "logging_config", "serve"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent  # the repository root (parent of app/)
TEMPLATES_DIR = ROOT / "templates"
STATIC_DIR = ROOT / "static"
SWAGGER = "/static/vendor/swagger-ui"
LOGGERS = ("app", "engine")  # the packages whose records the served app prints


def create_app(settings: Settings, *, run: engine.Run | None = None) -> FastAPI:
    """The dashboard app for ``settings.run``, opened once when the app starts (or ``run``,
    already opened, e.g. by ``influence demo`` right after building it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.run = (run if run is not None
                         else engine.open_run(settings.run, cache_bytes=settings.cache_mb << 20))
        app.state.dashboard = Dashboard(app.state.run)
        db = make_engine(settings.resolved_database_url)
        migrate(db)
        app.state.audit_sessions = session_factory(db)
        app.state.jobs = JobManager(workers=settings.job_workers, max_pending=settings.max_pending_jobs)
        logger.info("serving run %s (%d training, %d test points)", settings.run,
                    app.state.run.n_train, app.state.run.n_test)
        yield
        app.state.jobs.shutdown()
        db.dispose()

    app = FastAPI(title="influence-dashboard", version="0.1.0", lifespan=lifespan, docs_url=None,
                  description="Influence functions for image classifiers (Koh & Liang 2017). "
                              "Scores are I_up,loss: negative helpful, positive harmful.")
    app.state.settings = settings
    app.state.templates = Jinja2Templates(directory=TEMPLATES_DIR)
    app.state.templates.env.globals["limits"] = template_limits()
    install_error_handlers(app)
    app.add_middleware(GZip)  # pages, JSON and scripts
    app.add_middleware(BodyLimit, upload_limit=settings.upload_limit)  # inside the security headers
    install_security(app, cors_origins=settings.cors_origins)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for module in (meta, test_points, train_points, images, queries, jobs, quality, audits, assets, pages):
        app.include_router(module.router)

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        """Swagger UI from the local bundle (no CDN); its one inline script carries the CSP nonce."""
        page = get_swagger_ui_html(openapi_url="/openapi.json", title="influence-dashboard API",
                                   swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{SWAGGER}/swagger-ui.css",
                                   swagger_favicon_url="/static/favicon.svg")
        html = bytes(page.body).decode().replace("<script>", f'<script nonce="{csp_nonce(request)}">')
        return HTMLResponse(html)

    return app


def logging_config(level: str = "info") -> dict[str, Any]:
    """uvicorn's logging configuration (its formatters and handlers) with the app's and the
    engine's loggers printed the same way at ``level``; for ``logging.config.dictConfig``."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for name in LOGGERS:
        config["loggers"][name] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def serve(run_path: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          run: engine.Run | None = None) -> None:
    """Serve the dashboard for ``run_path`` with uvicorn (blocks until interrupted); log records
    of ``app`` and ``engine`` in uvicorn's format."""
    import torch
    import uvicorn

    settings = Settings(run=Path(run_path), host=host, port=port)
    torch.set_num_threads(settings.torch_threads)
    if run is not None:  # opened by the CLI (to refuse a bad run before serving): the served budget
        run.cache.resize(settings.cache_mb << 20)
    uvicorn.run(create_app(settings, run=run), host=settings.host, port=settings.port,
                log_config=logging_config(settings.log_level), log_level=settings.log_level)
