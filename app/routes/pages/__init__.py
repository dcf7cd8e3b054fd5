"""HTML pages (server-rendered Jinja2; figures built in :mod:`app.viz`, drawn by Plotly from the
local bundle), one module per resource as the REST routers are.

Every number comes from :class:`app.services.Dashboard`, the same calls the REST API makes, and
every view has a URL that reproduces it (its filters, IHVP method and top-k are query
parameters; the group page's retraining check too). An error on a page is an HTML error page
with its 4xx status, never JSON or a 500 (:class:`.base.PageRoute`).
"""

from __future__ import annotations

from fastapi import APIRouter

from . import groups, overview, query, test_points, train_points
from .base import PageRoute, error_page, render, url

__all__ = ["PageRoute", "error_page", "render", "router", "url"]

router = APIRouter(include_in_schema=False)
for _module in (overview, test_points, train_points, query, groups):
    router.include_router(_module.router)
