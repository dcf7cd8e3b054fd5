"""``/api/v1/test-points``: predictions and the training points that explain them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from ..deps import DashDep
from ..limits import DEFAULT_LIMIT, DEFAULT_TOP
from .params import ConfidenceParam, FastifParam, IhvpParam, LimitParam, OffsetParam, PoolParam, TopParam

router = APIRouter(prefix="/api/v1/test-points", tags=["test points"])


@router.get("")
def list_test_points(
    dash: DashDep,
    offset: OffsetParam = 0,
    limit: LimitParam = DEFAULT_LIMIT,
    label: Annotated[int | None, Query(description="true class")] = None,
    predicted: Annotated[int | None, Query(description="predicted class")] = None,
    misclassified: Annotated[bool | None, Query(description="only wrong (true) or right (false)")] = None,
    min_confidence: ConfidenceParam = None,
    max_confidence: ConfidenceParam = None,
) -> dict[str, Any]:
    """Test points matching every given filter, in id order: ``total`` matches, one page of ``items``."""
    return dash.test_points(offset=offset, limit=limit, label=label, predicted=predicted,
                            misclassified=misclassified, min_confidence=min_confidence,
                            max_confidence=max_confidence)


@router.get("/{test_id}")
def test_point(test_id: int, dash: DashDep) -> dict[str, Any]:
    """A test point's label, the model's predicted class and its class probabilities."""
    return dash.test_point(test_id)


@router.get("/{test_id}/influence")
def test_point_influence(
    test_id: int,
    dash: DashDep,
    top: TopParam = DEFAULT_TOP,
    ihvp: IhvpParam = None,
    fastif: FastifParam = None,
    pool: PoolParam = 0,
) -> dict[str, Any]:
    """The most helpful (most negative I_up,loss first) and harmful (most positive first) training points."""
    return dash.test_point_influence(test_id, top=top, ihvp=ihvp, fastif=fastif, pool=pool)


@router.get("/{test_id}/scores")
def test_point_scores(test_id: int, dash: DashDep, ihvp: IhvpParam = None) -> dict[str, Any]:
    """I_up,loss of every training point on this test point (in training-id order), and per class sums."""
    return dash.test_point_scores(test_id, ihvp=ihvp)
