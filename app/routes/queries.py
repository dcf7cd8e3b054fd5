"""``POST /api/v1/query`` (explain an uploaded image), ``POST /api/v1/group-influence`` and
``GET /api/v1/groups``. The retraining check of a group is a job (:mod:`app.routes.jobs`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Query, Request, UploadFile
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..deps import DashDep, SettingsDep
from ..images import UploadError
from ..limits import (
    DEFAULT_CLUSTERS,
    DEFAULT_TOP,
    MAX_CLUSTERS,
    MAX_GROUP_TESTS,
    MAX_GROUP_TRAIN,
    MULTIPART_OVERHEAD,
)
from .params import GroupTopParam, IhvpParam, TopParam

router = APIRouter(prefix="/api/v1", tags=["queries"])


class GroupRequest(BaseModel):
    """A group of training points and the test points whose losses it should be measured on."""

    train_ids: list[int] = Field(min_length=1, max_length=MAX_GROUP_TRAIN, description="the group")
    test_ids: list[int] = Field(min_length=1, max_length=MAX_GROUP_TESTS, description="test points")
    order: Literal[1, 2] = Field(default=1, description="1: sum of influences; 2: Basu et al. (2020)")
    ihvp: str | None = Field(default=None, description="IHVP method (default: the run's own)")


@router.post("/query")
async def query(
    request: Request,
    dash: DashDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="a PNG or JPEG image")],
    top: TopParam = DEFAULT_TOP,
    ihvp: IhvpParam = None,
    label: Annotated[int | None, Query(description="class whose loss to explain (default: predicted)")] = None,
    invert: Annotated[bool, Query(description="flip dark and light before converting")] = False,
) -> dict[str, Any]:
    """Explain an uploaded image: its prediction and the most helpful and harmful training points."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.upload_limit + MULTIPART_OVERHEAD:
        raise UploadError(413, f"the request is {int(declared):,} bytes; uploads are limited to "
                               f"{settings.upload_limit:,} bytes")
    data = await file.read(settings.upload_limit + 1)
    return await run_in_threadpool(dash.query, data, max_bytes=settings.upload_limit, top=top,
                                   ihvp=ihvp, label=label, invert=invert)


@router.post("/group-influence")
def group_influence(body: GroupRequest, dash: DashDep) -> dict[str, Any]:
    """Predicted change of each test loss when the whole group is removed (first or second order)."""
    return dash.group(body.train_ids, body.test_ids, order=body.order, ihvp=body.ihvp)


@router.get("/groups")
def group_members(
    dash: DashDep,
    by: Annotated[Literal["class", "mislabels", "cluster"], Query(description="how to choose")],
    label: Annotated[int | None, Query(description="class (by=class)")] = None,
    fraction: Annotated[float, Query(gt=0.0, le=1.0, description="first fraction of the members")] = 1.0,
    top: GroupTopParam = None,
    clusters: Annotated[int, Query(ge=2, le=MAX_CLUSTERS, description="k-means centres (by=cluster)")] = DEFAULT_CLUSTERS,
    cluster: Annotated[int | None, Query(ge=0, description="which centre (by=cluster)")] = None,
) -> dict[str, Any]:
    """Training ids of a group chosen by class, by the mislabel ranking, or by a k-means cluster."""
    return dash.group_members(by=by, label=label, fraction=fraction, top=top, clusters=clusters,
                              cluster=cluster)
