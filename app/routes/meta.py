"""``/api/v1/health`` and ``/api/v1/summary``: is the server up, and what run does it serve."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..deps import DashDep
from .params import IhvpParam

router = APIRouter(prefix="/api/v1", tags=["run"])


@router.get("/health")
def health(dash: DashDep) -> dict[str, Any]:
    """Whether the server is up, and the size, model and IHVP method of the run it serves."""
    return dash.health()


@router.get("/summary")
def summary(dash: DashDep, ihvp: IhvpParam = None) -> dict[str, Any]:
    """The run at a glance: data, model, accuracy, confusion matrix, IHVP method and diagnostics."""
    return dash.summary(ihvp)


@router.get("/trust")
def trust(dash: DashDep) -> dict[str, Any]:
    """The run's trust check: predicted vs actual retraining per IHVP method and damping."""
    return dash.trust()
