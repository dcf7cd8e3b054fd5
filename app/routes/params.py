"""Every query, path and form parameter alias of the routes and pages, declared once (so OpenAPI
describes them once, and a page and the API accept the same values).

API parameters (``…Param``) are plain typed query parameters. Page parameters (``Page…``,
``Form…``) come from HTML forms, which send ``label=`` for a field left empty: a blank value
means "not given" (``None``), and the constraints apply to a value that was given.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Form, Path, Query
from pydantic import BeforeValidator, Field

from ..limits import (
    DEFAULT_LIMIT,
    MAX_CLUSTERS,
    MAX_FASTIF,
    MAX_GROUP_TOP,
    MAX_ID_TEXT,
    MAX_LIMIT,
    MAX_POOL,
    MAX_TOP,
)

__all__ = ["ConfidenceParam", "FastifParam", "FormBool", "FormIhvp", "FormInt", "FormTop", "GroupBy",
           "GroupTopParam", "IhvpParam", "ItemIdParam", "LimitParam", "OffsetParam", "PageBool",
           "PageClusters", "PageConfidence", "PageFraction", "PageGroupBy", "PageGroupTop", "PageIds",
           "PageIhvp", "PageInt", "PageLimit", "PageOffset", "PageOrder", "PageRankBy", "PageTop",
           "PoolParam", "RankBy", "SlugParam", "TopParam", "blank_is_none"]

MAX_OFFSET = 2**63 - 1  # the largest OFFSET the audit databases take (a signed 64-bit integer)
MAX_ITEM_ID = 2**31 - 1  # audit item ids are 32-bit integer keys
SLUG_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # what ``secrets.token_urlsafe`` makes, up to the column's 64

RankBy = Literal["self_influence", "loss", "grad_norm"]
GroupBy = Literal["class", "mislabels", "cluster", "ids"]

# value constraints, shared by the API's and the pages' parameters
Top = Annotated[int, Field(ge=1, le=MAX_TOP)]
Offset = Annotated[int, Field(ge=0, le=MAX_OFFSET)]
Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT)]
Confidence = Annotated[float, Field(ge=0.0, le=1.0)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
GroupTop = Annotated[int, Field(ge=1, le=MAX_GROUP_TOP)]
Clusters = Annotated[int, Field(ge=2, le=MAX_CLUSTERS)]
Order = Annotated[int, Field(ge=1, le=2)]
IdText = Annotated[str, Field(max_length=MAX_ID_TEXT)]

# ------------------------------------------------------------------------------- the REST API
TopParam = Annotated[int, Query(ge=1, le=MAX_TOP, description="entries per list")]
IhvpParam = Annotated[str | None, Query(description="IHVP method (default: the run's own)")]
OffsetParam = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="entries to skip")]
LimitParam = Annotated[int, Query(ge=1, le=MAX_LIMIT,
                                  description=f"entries per page (default {DEFAULT_LIMIT})")]
ConfidenceParam = Annotated[float | None, Query(ge=0.0, le=1.0)]
FastifParam = Annotated[int | None, Query(ge=1, le=MAX_FASTIF, description=(
    "FastIF: score only this many nearest training points in the model's feature space"))]
PoolParam = Annotated[int, Query(ge=0, le=MAX_POOL, description=(
    "with fastif: also score the points of largest gradient norm"))]
GroupTopParam = Annotated[int | None, Query(ge=1, le=MAX_GROUP_TOP, description="how many (by=mislabels)")]
SlugParam = Annotated[str, Path(pattern=SLUG_PATTERN, description="the audit's permalink id")]
ItemIdParam = Annotated[int, Path(ge=1, le=MAX_ITEM_ID, description="the item's id")]


# ------------------------------------------------------------------------------- the pages
def blank_is_none(value: Any) -> Any:
    """An empty form field means 'not given' (HTML forms send ``label=`` for an unset filter)."""
    return None if isinstance(value, str) and not value.strip() else value


Blank = BeforeValidator(blank_is_none)
# constraints sit on the inner type: they apply to a given value, after a blank became None
PageInt = Annotated[int | None, Blank, Query()]
PageBool = Annotated[bool | None, Blank, Query()]
PageConfidence = Annotated[Confidence | None, Blank, Query()]
PageTop = Annotated[Top | None, Blank, Query()]
PageOffset = Annotated[Offset | None, Blank, Query()]
PageLimit = Annotated[Limit | None, Blank, Query()]
PageIhvp = Annotated[str | None, Blank, Query()]
PageRankBy = Annotated[RankBy | None, Blank, Query()]
PageGroupBy = Annotated[GroupBy | None, Blank, Query()]
PageFraction = Annotated[Fraction | None, Blank, Query()]
PageGroupTop = Annotated[GroupTop | None, Blank, Query()]
PageClusters = Annotated[Clusters | None, Blank, Query()]
PageOrder = Annotated[Order | None, Blank, Query()]
PageIds = Annotated[IdText | None, Blank, Query()]
FormTop = Annotated[Top | None, Blank, Form()]
FormIhvp = Annotated[str | None, Blank, Form()]
FormInt = Annotated[int | None, Blank, Form()]
FormBool = Annotated[bool, Form()]
