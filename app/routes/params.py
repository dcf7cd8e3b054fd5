"""Query and path parameters shared by several routes (declared once, so OpenAPI describes them once)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from ..services import DEFAULT_LIMIT, MAX_LIMIT, MAX_TOP

__all__ = ["IhvpParam", "ItemIdParam", "LimitParam", "OffsetParam", "SlugParam", "TopParam"]

MAX_OFFSET = 2**63 - 1  # the largest OFFSET the audit databases take (a signed 64-bit integer)
MAX_ITEM_ID = 2**31 - 1  # audit item ids are 32-bit integer keys
SLUG_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # what ``secrets.token_urlsafe`` makes, up to the column's 64

TopParam = Annotated[int, Query(ge=1, le=MAX_TOP, description="entries per list")]
IhvpParam = Annotated[str | None, Query(description="IHVP method (default: the run's own)")]
OffsetParam = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="entries to skip")]
LimitParam = Annotated[int, Query(ge=1, le=MAX_LIMIT,
                                  description=f"entries per page (default {DEFAULT_LIMIT})")]
SlugParam = Annotated[str, Path(pattern=SLUG_PATTERN, description="the audit's permalink id")]
ItemIdParam = Annotated[int, Path(ge=1, le=MAX_ITEM_ID, description="the item's id")]
