"""Dependencies the routes declare (tests override them through ``app.dependency_overrides``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .services import Dashboard
from .settings import Settings

__all__ = ["DashDep", "SettingsDep", "get_dashboard", "get_settings"]


def get_dashboard(request: Request) -> Dashboard:
    """The dashboard over the run the app's lifespan opened."""
    return request.app.state.dashboard


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


DashDep = Annotated[Dashboard, Depends(get_dashboard)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
