"""Routes: the first ``/api/v1`` REST routes (JSON) and the overview page at ``/``.

Handlers are plain ``def`` on purpose: they run engine code, so FastAPI runs them in its
threadpool instead of blocking the event loop. Engine errors are not caught here; the app maps
them to JSON errors in one handler (:func:`error_status` decides the status).
"""

from __future__ import annotations

import io
import math
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from PIL import Image

from engine import IndexOutOfRange, InfluenceError, QueryError, Run

__all__ = ["router", "pages", "get_run", "RunDep", "error_status", "png_bytes", "SPLITS",
           "MIN_IMAGE_SIDE", "MAX_TOP", "DEFAULT_TOP", "IMAGE_CACHE"]

MIN_IMAGE_SIDE = 128  # served images are scaled up (nearest neighbour) to at least this short side
MAX_TOP = 500
DEFAULT_TOP = 10
IMAGE_CACHE = "public, max-age=86400"
SPLITS = ("train", "test")  # checked by hand in the image route: a bad split is a 404, not a 422

router = APIRouter(prefix="/api/v1", tags=["api"])
pages = APIRouter(include_in_schema=False)


def get_run(request: Request) -> Run:
    """The run opened by the app's lifespan (override this dependency in tests)."""
    return request.app.state.run


RunDep = Annotated[Run, Depends(get_run)]


def error_status(exc: InfluenceError) -> int:
    """HTTP status for an engine error: 404 for an index out of range, 422 for another bad
    query, 400 for anything else the user caused."""
    if isinstance(exc, IndexOutOfRange):
        return 404
    if isinstance(exc, QueryError):
        return 422
    return 400


def _check_index(index: int, n: int, what: str) -> int:
    if not 0 <= index < n:
        raise IndexOutOfRange(f"{what} index {index} is out of range 0..{n - 1}")
    return index


def _prediction(run: Run, test_id: int) -> dict[str, Any]:
    i = _check_index(test_id, run.n_test, "test")
    proba = run.predict_proba(run.dataset.x_test[i : i + 1])[0]  # (C,)
    return {"test_id": i, "label": int(run.dataset.y_test[i]), "predicted": int(proba.argmax()),
            "probabilities": [float(p) for p in proba]}


def png_bytes(x: np.ndarray, *, min_side: int = MIN_IMAGE_SIDE) -> bytes:
    """Encode one input as PNG: grayscale (H, W), (H, W, 1); LA, RGB or RGBA (H, W, 2..4); a flat
    (d,) input as a square when d is one, else as one row. Values in [0, 1] map to 0..255 (other
    ranges are min-max scaled per image); the image is enlarged by an integer factor, nearest
    neighbour, so that its short side is at least ``min_side`` pixels."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        side = math.isqrt(a.size)
        a = a.reshape(side, side) if side * side == a.size else a.reshape(1, -1)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    a = np.nan_to_num(a)
    lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
    if lo < 0.0 or hi > 1.0:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    pixels = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)  # (H, W[, C])
    factor = max(1, math.ceil(min_side / min(pixels.shape[:2])))
    pixels = np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# /api/v1


@router.get("/health")
def health(run: RunDep) -> dict[str, Any]:
    """Whether the server is up, and a summary of the run it serves."""
    return {"status": "ok", "n_train": run.n_train, "n_test": run.n_test,
            "model": run.info["model"]["kind"], "ihvp": run.default_method.value,
            "test_accuracy": run.info["training"].get("test_accuracy")}


@router.get("/test-points/{test_id}")
def test_point(test_id: int, run: RunDep) -> dict[str, Any]:
    """A test point's label, the model's predicted class and its class probabilities."""
    return _prediction(run, test_id)


@router.get("/test-points/{test_id}/influence")
def test_point_influence(
    test_id: int,
    run: RunDep,
    top: Annotated[int, Query(ge=1, le=MAX_TOP, description="training points per list")] = DEFAULT_TOP,
    ihvp: Annotated[str | None, Query(description="IHVP method (default: the run's)")] = None,
) -> dict[str, Any]:
    """The most helpful (most negative I_up,loss first) and harmful (most positive first) training points."""
    return run.explain(test_id, top=top, ihvp=ihvp)


@router.get("/images/{split}/{image_id}.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such image"}})
def image(split: str, image_id: int, run: RunDep) -> Response:
    """One training or test image as PNG, scaled up to at least 128 px on the short side."""
    if split not in SPLITS:
        raise HTTPException(404, f"unknown split {split!r}: use train or test")
    data = run.dataset.x_train if split == "train" else run.dataset.x_test
    i = _check_index(image_id, data.shape[0], split)
    return Response(png_bytes(data[i]), media_type="image/png",
                    headers={"Cache-Control": IMAGE_CACHE})


# ---------------------------------------------------------------------------------------------
# pages


def _parse_int(raw: str | None, name: str, *, lo: int, hi: int,
               error: type[QueryError] = QueryError) -> int | None:
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise error(f"{name} {value} is out of range {lo}..{hi}")
    return value


@pages.get("/", response_class=HTMLResponse)
def index(request: Request, run: RunDep, test_id: str | None = None, top: str | None = None
          ) -> Response:
    """Overview of the run; with ``test_id``, the test image and its top-k helpful and harmful
    training images."""
    context: dict[str, Any] = {
        "info": run.info, "source": run.dataset.source, "n_train": run.n_train,
        "n_test": run.n_test, "ihvp": run.default_method.value,
        "class_names": run.dataset.class_names, "top": DEFAULT_TOP, "test_id": None,
        "result": None, "error": None,
    }
    status = 200
    try:
        k = _parse_int(top, "top", lo=1, hi=MAX_TOP)
        context["top"] = DEFAULT_TOP if k is None else k
        i = _parse_int(test_id, "test point", lo=0, hi=run.n_test - 1, error=IndexOutOfRange)
        if i is not None:
            context["test_id"] = i
            context["result"] = run.explain(i, top=context["top"])
    except InfluenceError as exc:
        context["error"] = " ".join(str(exc).split())
        status = error_status(exc)
    return request.app.state.templates.TemplateResponse(request, "index.html", context,
                                                        status_code=status)
