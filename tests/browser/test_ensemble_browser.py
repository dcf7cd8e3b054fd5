"""The consistency display of an ensemble run in headless Chromium: the test-point page says the
scores are averaged over the N models and shows, under every listed training image, how many of
them agree (a meter and "k/N models agree", as the API's consistency field says); a single-model
run's page shows none of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..app.test_ensemble_api import MEMBERS, build_ensemble_run
from .conftest import Tab, open_tab, serving

pytestmark = pytest.mark.browser

TOP = 4


@pytest.fixture(scope="module")
def ensemble_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run = build_ensemble_run(tmp_path_factory.mktemp("browser-runs"))
    with serving(run) as base:
        yield base


@pytest.fixture
def etab(browser: Any, ensemble_url: str, screenshot_dirs: list[Path]) -> Iterator[Tab]:
    with open_tab(browser, ensemble_url, screenshot_dirs) as t:
        yield t


def test_test_point_page_shows_how_consistent_each_image_is(etab: Tab) -> None:
    api = etab.page.request.get(f"{etab.base}/api/v1/test-points/2/influence?top={TOP}").json()
    etab.goto(f"/test-points/2?top={TOP}")
    etab.wait_for_plots("probabilities", "histogram")
    note = etab.page.locator("#ensemble-note")
    assert note.is_visible()
    assert f"averaged over {MEMBERS} independently trained models" in note.inner_text()
    for key in ("helpful", "harmful"):
        side = etab.page.locator(f".side.{key}")
        assert etab.loaded_images(f".side.{key} ul.thumbs img") == TOP
        badges = side.locator(".consistency .agree").all_inner_texts()
        want = [f"{i['consistency']['agree_count']}/{MEMBERS} models agree" for i in api[key]]
        assert badges == want
        meters = side.locator(".consistency meter")
        assert meters.count() == TOP
        assert [float(meters.nth(k).get_attribute("value") or -1) for k in range(TOP)] == [
            float(i["consistency"]["agree_count"]) for i in api[key]]
        assert side.locator(".consistency").first.is_visible()
    # the badge styles come from the page's own stylesheet
    weight = etab.page.evaluate(
        "getComputedStyle(document.querySelector('.consistency meter')).width")
    assert weight.endswith("px") and float(weight[:-2]) > 10
    etab.screenshot("ensemble_test_point")
    etab.assert_clean()


def test_a_single_model_page_has_no_consistency_display(tab: Tab) -> None:
    tab.goto("/test-points/0")
    tab.wait_for_plots("probabilities")
    assert tab.page.locator("#ensemble-note").count() == 0
    assert tab.page.locator(".consistency").count() == 0
    tab.assert_clean()
