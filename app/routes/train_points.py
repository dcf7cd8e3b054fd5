"""``/api/v1/train-points`` and ``/api/v1/self-influence``: training points and likely mislabels."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from ..deps import DashDep
from ..limits import DEFAULT_LIMIT, DEFAULT_TOP
from .params import IhvpParam, LimitParam, OffsetParam, TopParam

router = APIRouter(prefix="/api/v1", tags=["training points"])


@router.get("/train-points/{train_id}")
def train_point(train_id: int, dash: DashDep, ihvp: IhvpParam = None) -> dict[str, Any]:
    """A training point's label, predicted class, self-influence and its rank by magnitude (1 = largest)."""
    return dash.train_point(train_id, ihvp=ihvp)


@router.get("/train-points/{train_id}/influence")
def train_point_influence(train_id: int, dash: DashDep, top: TopParam = DEFAULT_TOP,
                          ihvp: IhvpParam = None) -> dict[str, Any]:
    """The test points this training point helps most (most negative first) and harms most."""
    return dash.train_point_influence(train_id, top=top, ihvp=ihvp)


@router.get("/train-points/{train_id}/params")
def train_point_params(train_id: int, dash: DashDep, ihvp: IhvpParam = None) -> dict[str, Any]:
    """I_up,params of this training point per parameter tensor: which layers it moves most."""
    return dash.train_point_params(train_id, ihvp=ihvp)


@router.get("/self-influence")
def self_influence(
    dash: DashDep,
    top: LimitParam = DEFAULT_LIMIT,
    offset: OffsetParam = 0,
    ihvp: IhvpParam = None,
    by: Annotated[Literal["self_influence", "loss", "grad_norm"],
                  Query(description="rank by |self-influence| or a simple baseline")] = "self_influence",
) -> dict[str, Any]:
    """Training points ranked by |self-influence|, likely mislabelled first (``top`` per page)."""
    return dash.self_influence_ranking(top=top, offset=offset, ihvp=ihvp, by=by)
