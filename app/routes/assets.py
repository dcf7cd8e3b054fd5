"""Static assets that come from installed packages (the Plotly bundle), served locally: no CDN."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)

ASSET_CACHE = "public, max-age=604800"


def plotly_bundle() -> Path:
    """The minified plotly.js shipped inside the ``plotly`` Python package."""
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


@router.get("/assets/plotly.min.js")
def plotly_js() -> FileResponse:
    path = plotly_bundle()
    if not path.is_file():
        raise HTTPException(404, "plotly.min.js is missing from the installed plotly package")
    return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": ASSET_CACHE})
