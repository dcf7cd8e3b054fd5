"""Query parameters shared by several routes (declared once, so OpenAPI describes them once)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from ..services import DEFAULT_LIMIT, MAX_LIMIT, MAX_TOP

__all__ = ["IhvpParam", "LimitParam", "OffsetParam", "TopParam"]

TopParam = Annotated[int, Query(ge=1, le=MAX_TOP, description="entries per list")]
IhvpParam = Annotated[str | None, Query(description="IHVP method (default: the run's own)")]
OffsetParam = Annotated[int, Query(ge=0, description="entries to skip")]
LimitParam = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"entries per page (default {DEFAULT_LIMIT})")]
