"""``/api/v1/images/{split}/{id}.png``: data points as PNG, scaled up without blurring."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from ..deps import DashDep
from ..images import png_bytes
from ..services import check_index

router = APIRouter(prefix="/api/v1", tags=["images"])

IMAGE_CACHE = "public, max-age=86400"
SPLITS = ("train", "test")  # checked by hand: a bad split is a 404, not a 422


@router.get("/images/{split}/{image_id}.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such image"}})
def image(split: str, image_id: int, dash: DashDep) -> Response:
    """One training or test image as PNG, scaled up to at least 128 px on the short side."""
    if split not in SPLITS:
        raise HTTPException(404, f"unknown split {split!r}: use train or test")
    data = dash.run.dataset.x_train if split == "train" else dash.run.dataset.x_test
    i = check_index(image_id, data.shape[0], split)
    return Response(png_bytes(data[i]), media_type="image/png", headers={"Cache-Control": IMAGE_CACHE})
