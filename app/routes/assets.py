"""The Plotly bundle, served locally (no CDN): plotly.js built with only the traces the pages draw
(bar, heatmap, scatter: 1.18 MB where the full bundle is 4.8 MB), vendored under
``static/vendor/plotly/`` with its licence and the script that builds it.

Pages load it from a versioned URL (``PLOTLY_URL``, route name ``plotly_js``) that browsers may
cache for a year without asking again: a new version gets a new URL. The old unversioned
``/assets/plotly.min.js`` answers the same file with a short cache, for links saved before."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

__all__ = ["ASSET_CACHE", "IMMUTABLE_CACHE", "PLOTLY_TRACES", "PLOTLY_URL", "PLOTLY_VERSION",
           "plotly_bundle", "router"]

router = APIRouter(include_in_schema=False)

PLOTLY_VERSION = "4.1.1"  # plotly.js on the npm registry
PLOTLY_TRACES = ("bar", "heatmap", "scatter")  # the only trace types the bundle has (build.mjs)
PLOTLY_URL = f"/assets/plotly-{PLOTLY_VERSION}.min.js"
LEGACY_PLOTLY_URL = "/assets/plotly.min.js"
VENDOR = Path(__file__).resolve().parents[2] / "static" / "vendor" / "plotly"
ASSET_CACHE = "public, max-age=604800"
IMMUTABLE_CACHE = "public, max-age=31536000, immutable"
JS = "text/javascript"


def plotly_bundle() -> Path:
    """The vendored minified plotly.js partial bundle (one self-contained file)."""
    return VENDOR / f"plotly-{PLOTLY_VERSION}-{'-'.join(PLOTLY_TRACES)}.min.js"


@router.get(PLOTLY_URL, name="plotly_js")
def plotly_js() -> FileResponse:
    return FileResponse(plotly_bundle(), media_type=JS, headers={"Cache-Control": IMMUTABLE_CACHE})


@router.get(LEGACY_PLOTLY_URL)
def plotly_js_unversioned() -> FileResponse:
    return FileResponse(plotly_bundle(), media_type=JS, headers={"Cache-Control": ASSET_CACHE})
