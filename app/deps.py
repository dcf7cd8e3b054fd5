"""Every dependency a route declares, in one place: what the app's lifespan opened (the run, its
dashboard, the job manager, the audit database), the settings and the templates, as ``Annotated``
aliases that tests override through ``app.dependency_overrides``; and the writer guard.

Routes reach shared state only through these (never ``request.app.state`` themselves); code that
runs outside dependency injection (the page error handler) calls the ``get_*`` functions.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

import engine

from .audits.store import Forbidden
from .jobs import JobManager
from .security import Authorization, api_key, carries_api_key
from .services import Dashboard
from .settings import Settings

__all__ = ["AuditSessionDep", "DashDep", "JobsDep", "RunDep", "SettingsDep", "TemplatesDep",
           "WriterDep", "get_audit_sessions", "get_dashboard", "get_jobs", "get_run", "get_settings",
           "get_templates", "optional_dashboard", "require_writer"]


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


def get_templates(request: Request) -> Jinja2Templates:
    """The Jinja2 templates of the pages."""
    return request.app.state.templates


def get_run(request: Request) -> engine.Run:
    """The run the app's lifespan opened."""
    return request.app.state.run


def get_dashboard(request: Request) -> Dashboard:
    """The dashboard over the run the app's lifespan opened."""
    return request.app.state.dashboard


def optional_dashboard(request: Request) -> Dashboard | None:
    """The dashboard, or ``None`` when the lifespan has not opened the run (an error page then)."""
    return getattr(request.app.state, "dashboard", None)


def get_jobs(request: Request) -> JobManager:
    """The background job manager."""
    return request.app.state.jobs


def get_audit_sessions(request: Request) -> sessionmaker[Session]:
    """Sessions on the audit database."""
    return request.app.state.audit_sessions


SettingsDep = Annotated[Settings, Depends(get_settings)]
TemplatesDep = Annotated[Jinja2Templates, Depends(get_templates)]
RunDep = Annotated[engine.Run, Depends(get_run)]
DashDep = Annotated[Dashboard, Depends(get_dashboard)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
AuditSessionDep = Annotated[sessionmaker[Session], Depends(get_audit_sessions)]


def require_writer(settings: SettingsDep, authorization: Authorization = None) -> None:
    """Dependency of the routes that create state or start jobs: with an API key set, the
    request must carry it (403 otherwise); without one, anyone on the network may write."""
    if api_key(settings) is not None and not carries_api_key(settings, authorization):
        raise Forbidden("this server needs its API key for this request: send "
                        "'Authorization: Bearer <API key>'")


WriterDep = Depends(require_writer)
