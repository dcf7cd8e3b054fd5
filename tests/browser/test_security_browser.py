"""A team server with an API key, in the browser: saving an audit from a page asks for the key once
(static/audit.js keeps it in localStorage, never in a URL), a dismissed prompt says why nothing was
saved, and the pages run under the server's Content-Security-Policy without a single violation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Tab, open_tab, serving

pytestmark = pytest.mark.browser

API_KEY = "team-key-for-the-browser-0123"
TRAIN_ID = 11


@pytest.fixture(scope="module")
def keyed_url(browser_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    db = tmp_path_factory.mktemp("keyed-db") / "audits.sqlite3"
    with serving(browser_run, api_key=API_KEY, database_url=f"sqlite:///{db}") as base:
        yield base


@pytest.fixture
def tab(browser: Any, keyed_url: str, screenshot_dirs: list[Path]) -> Iterator[Tab]:
    with open_tab(browser, keyed_url, screenshot_dirs) as t:
        yield t


def _mark(tab: Tab) -> None:
    tab.goto(f"/train-points/{TRAIN_ID}")
    tab.wait_for_plots("probabilities")
    tab.page.locator("form[data-audit-add=mislabel] button[type=submit]").click()


def _toast(tab: Tab) -> str:
    tab.page.wait_for_function("() => { const el = document.getElementById('audit-toast');"
                               " return el && !el.hidden && el.innerText.trim().length > 0; }")
    return tab.page.locator("#audit-toast").inner_text()


def test_saving_asks_for_the_key_once_and_keeps_it_out_of_urls(tab: Tab) -> None:
    prompts: list[str] = []

    def answer(dialog: Any) -> None:
        prompts.append(dialog.message)
        dialog.accept(API_KEY)

    tab.page.on("dialog", answer)
    tab.expected_status["/api/v1/audits"] = 403  # the first try, before the key is known
    _mark(tab)
    assert "1 item" in _toast(tab)
    assert len(prompts) == 1 and "API key" in prompts[0]
    assert tab.page.evaluate("localStorage.getItem('influence.apiKey')") == API_KEY
    held = json.loads(tab.page.evaluate("localStorage.getItem('influence.audits')"))
    slug = held["current"]
    audit = tab.page.request.get(f"{tab.base}/api/v1/audits/{slug}").json()
    assert [(it["kind"], it["train_id"]) for it in audit["items"]] == [("mislabel", TRAIN_ID)]

    # a second audit from the same browser: the kept key is sent, no second prompt
    tab.page.evaluate("localStorage.removeItem('influence.audits')")
    _mark(tab)
    assert "1 item" in _toast(tab)
    assert len(prompts) == 1
    visited = tab.page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    assert not any(API_KEY in url for url in [tab.page.url, *visited])
    tab.screenshot("keyed_server_saved")
    tab.assert_clean()


def test_a_dismissed_prompt_saves_nothing_and_says_why(tab: Tab) -> None:
    tab.page.on("dialog", lambda dialog: dialog.dismiss())
    tab.expected_status["/api/v1/audits"] = 403
    _mark(tab)
    text = _toast(tab)
    assert "API key" in text and "403" in text
    assert tab.page.evaluate("localStorage.getItem('influence.audits')") in (None, "null") or \
        not json.loads(tab.page.evaluate("localStorage.getItem('influence.audits')"))["audits"]
    tab.assert_clean()


@pytest.mark.parametrize("path", ["/", "/test-points", "/test-points/3", "/train-points/11", "/mislabels",
                                  "/query", "/groups?by=class&label=1&fraction=0.2", "/docs"])
def test_pages_run_under_the_policy(tab: Tab, path: str) -> None:
    violations: list[str] = []
    tab.page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    response = tab.goto(path)
    assert "script-src 'self' 'nonce-" in response.headers["content-security-policy"]
    tab.page.wait_for_load_state("networkidle")
    assert violations == []
    tab.assert_clean()
