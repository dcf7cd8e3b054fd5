"""Every page on a small ResNet run (issue 13) in headless Chromium: a Kronecker-projected float32
store with Fisher and EK-FAC curvature. Each page draws its main content without a console error,
the overview says what is tracked and in which space the gradients are stored, and what needs
full gradients (other solvers, second-order groups) is refused with a message, not a 500."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..app.test_resnet_api import N_TRAIN, K, build_resnet_run
from .conftest import Tab, open_tab, serving
from .test_pages_browser import TOP, digit_png

pytestmark = pytest.mark.browser

METHODS = ["fisher", "ekfac"]


@pytest.fixture(scope="module")
def resnet_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run = build_resnet_run(tmp_path_factory.mktemp("browser-runs") / "digits-resnet")
    with serving(run) as base:
        yield base


@pytest.fixture
def rtab(browser: Any, resnet_url: str, screenshot_dirs: list[Path]) -> Iterator[Tab]:
    with open_tab(browser, resnet_url, screenshot_dirs) as t:
        yield t


def goto_served(tab: Tab, path: str) -> None:
    """Open ``path``; a 5xx raises."""
    response = tab.goto(path)
    if response.status >= 500:
        raise RuntimeError(f"{path} answered {response.status}")


def text(tab: Tab, selector: str) -> str:
    return tab.page.locator(selector).inner_text()


def test_overview_shows_what_is_tracked_and_the_store_space(rtab: Tab) -> None:
    rtab.goto("/")
    rtab.wait_for_plots("confusion")
    assert text(rtab, "#tracked") == "every parameter"
    assert text(rtab, "#store-space").startswith(f"kronecker projection to K = {K}")
    assert "float32" in text(rtab, "#store-space")
    rtab.screenshot("resnet_overview")
    rtab.assert_clean()


def test_test_point_gallery(rtab: Tab) -> None:
    rtab.goto("/test-points")
    assert rtab.loaded_images(".gallery img") > 0
    rtab.assert_clean()


@pytest.mark.parametrize("method", METHODS)
def test_test_point_with_each_method(rtab: Tab, method: str) -> None:
    rtab.goto(f"/test-points/0?ihvp={method}")
    rtab.wait_for_plots("probabilities", "histogram", "by-class")
    assert rtab.loaded_images("ul.thumbs img") == 2 * TOP
    assert rtab.page.locator(".facts code").first.inner_text() == method
    options = rtab.page.eval_on_selector_all("select[name=ihvp] option", "os => os.map(o => o.value)")
    assert options == METHODS
    assert rtab.page.locator("select[name=ihvp]").input_value() == method
    rtab.screenshot(f"resnet_test_point_{method}")
    rtab.assert_clean()


def test_a_method_that_needs_full_gradients_is_explained(rtab: Tab) -> None:
    rtab.expected_status["/test-points/0?ihvp=exact"] = 422
    response = rtab.goto("/test-points/0?ihvp=exact")
    assert response.status == 422
    card = text(rtab, ".error-card")
    assert "'exact' cannot be used with this run" in card and "fisher, ekfac" in card
    rtab.assert_clean()


def test_train_point(rtab: Tab) -> None:
    goto_served(rtab, "/train-points/0")
    rtab.wait_for_plots("probabilities")
    assert rtab.loaded_images("ul.thumbs img") == 2 * TOP
    assert f"of {N_TRAIN}" in text(rtab, ".facts")
    assert "Not available for this run" in text(rtab, "main")  # I_up,params needs full gradients
    rtab.screenshot("resnet_train_point")
    rtab.assert_clean()


def test_mislabel_review(rtab: Tab) -> None:
    rtab.goto("/mislabels?limit=24")
    assert rtab.loaded_images(".ranking img") == 24
    assert rtab.page.locator(".ranking .rank").all_inner_texts() == [f"#{r}" for r in range(1, 25)]
    rtab.assert_clean()


def test_class_group_first_order(rtab: Tab) -> None:
    goto_served(rtab, "/groups?by=class&label=1")
    assert rtab.loaded_images(".group-thumbs img") > 0
    rtab.wait_for_plots("changes")
    assert "Order 2 is not available" in text(rtab, "main")
    assert "full gradients" in text(rtab, "main")
    rtab.screenshot("resnet_groups")
    rtab.assert_clean()


def test_second_order_group_is_refused_with_a_message(rtab: Tab) -> None:
    path = "/groups?by=class&label=1&order=2"
    rtab.expected_status[path] = 422
    response = rtab.goto(path)
    assert response.status == 422
    assert "second-order group influence needs full gradients" in text(rtab, "p.error[role=alert]")
    rtab.assert_clean()


def test_query_with_an_uploaded_png(rtab: Tab) -> None:
    rtab.goto("/query")
    with rtab.page.expect_navigation():  # choosing a file submits the form
        rtab.page.set_input_files("#upload-file", files=[
            {"name": "seven.png", "mimeType": "image/png", "buffer": digit_png()}])
    rtab.page.wait_for_selector("#result")
    rtab.wait_for_plots("probabilities")
    assert rtab.loaded_images("ul.thumbs img") == 2 * TOP
    assert "seven.png" in text(rtab, "#result .facts")
    rtab.screenshot("resnet_query")
    rtab.assert_clean()
