"""The OpenAPI reference at /docs renders from the vendored Swagger UI, with no network beyond
the server and no console errors, and lists the contract's routes."""

from __future__ import annotations

import pytest

from .conftest import Tab

pytestmark = pytest.mark.browser


def test_docs_render_offline(tab: Tab) -> None:
    tab.goto("/docs")
    tab.page.wait_for_selector(".swagger-ui .opblock")
    paths = tab.page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent)")
    for route in ("/api/v1/health", "/api/v1/test-points/{test_id}/influence", "/api/v1/query",
                  "/api/v1/self-influence", "/api/v1/group-influence", "/api/v1/audits/{slug}"):
        assert any(route in p.replace("\u200b", "") for p in paths), route
    assert tab.page.locator(".swagger-ui .info .title").inner_text().startswith("influence-dashboard")
    tab.screenshot("docs")
    tab.assert_clean()
