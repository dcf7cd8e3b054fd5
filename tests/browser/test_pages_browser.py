"""The dashboard's pages in headless Chromium: plots draw, images load, links and forms lead
where they should, uploads are explained, and no page logs an error or fails a request."""

from __future__ import annotations

import io
import re
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image, ImageDraw

from .conftest import Tab

pytestmark = pytest.mark.browser

TOP = 10  # the pages' default top-k


def digit_png(*, size: int = 64) -> bytes:
    """A light '7' on a dark background, like the digits data set."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    w = size // 8
    draw.line([(size * 0.2, size * 0.2), (size * 0.8, size * 0.2)], fill=255, width=w)
    draw.line([(size * 0.8, size * 0.2), (size * 0.4, size * 0.85)], fill=255, width=w)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def test_overview_draws_the_confusion_matrix_and_a_cell_opens_the_gallery(tab: Tab) -> None:
    tab.goto("/")
    tab.wait_for_plots("confusion")
    assert tab.page.locator("#plot-confusion .heatmaplayer").count() == 1
    assert tab.page.locator("header.site-header nav a.active").inner_text() == "Overview"
    tab.screenshot("overview")
    tab.assert_clean()

    # click the centre of cell (true 2, predicted 2): rows run top to bottom (reversed y axis)
    n = tab.page.evaluate("document.getElementById('plot-confusion').data[0].z.length")
    box = tab.page.locator("#plot-confusion .nsewdrag").first.bounding_box()
    assert box is not None
    x = box["x"] + box["width"] * (2 + 0.5) / n
    y = box["y"] + box["height"] * (2 + 0.5) / n
    with tab.page.expect_navigation():
        tab.page.mouse.click(x, y)
    assert urlsplit(tab.page.url).path == "/test-points"
    assert query_of(tab.page.url) == {"label": ["2"], "predicted": ["2"]}
    assert tab.loaded_images(".gallery img") > 0
    tab.assert_clean()


def test_gallery_filters_and_opens_a_test_point_with_its_explanation(tab: Tab) -> None:
    tab.goto("/test-points?misclassified=true")
    n_tiles = tab.loaded_images(".gallery img")
    assert n_tiles == tab.page.locator(".gallery .tile.is-wrong").count() > 0
    tab.screenshot("test_points")

    with tab.page.expect_navigation():
        tab.page.locator(".gallery .tile a").first.click()
    assert re.fullmatch(r"/test-points/\d+", urlsplit(tab.page.url).path)
    tab.wait_for_plots("probabilities", "histogram", "by-class")
    assert tab.loaded_images(".side.helpful ul.thumbs img") == TOP
    assert tab.loaded_images(".side.harmful ul.thumbs img") == TOP
    assert tab.loaded_images("ul.thumbs img") == 2 * TOP
    assert tab.loaded_images("img.hero") == 1
    # the histogram marks every shown point
    marked = tab.page.evaluate(
        "document.getElementById('plot-histogram').data.slice(1).map(t => t.x.length)")
    assert marked == [TOP, TOP]
    tab.screenshot("test_point")
    tab.assert_clean()


def test_test_point_form_switches_method_and_k_in_the_url(tab: Tab) -> None:
    tab.goto("/test-points/0")
    tab.wait_for_plots("probabilities")
    tab.page.select_option("select[name=ihvp]", "cg")
    tab.page.fill("input[name=top]", "3")
    with tab.page.expect_navigation():
        tab.page.locator("form.inline button").click()
    assert urlsplit(tab.page.url).path == "/test-points/0"
    assert query_of(tab.page.url) == {"ihvp": ["cg"], "top": ["3"]}
    assert tab.loaded_images("ul.thumbs img") == 6
    tab.wait_for_plots("histogram", "by-class")
    # the links carry the chosen method to the training-point page
    href = tab.page.locator(".side.helpful ul.thumbs a").first.get_attribute("href")
    assert href is not None and href.endswith("?ihvp=cg")
    tab.assert_clean()


def test_training_point_page_from_a_test_point(tab: Tab) -> None:
    tab.goto("/test-points/1")
    tab.wait_for_plots("probabilities")
    with tab.page.expect_navigation():
        tab.page.locator(".side.helpful ul.thumbs a").first.click()
    assert re.fullmatch(r"/train-points/\d+", urlsplit(tab.page.url).path)
    tab.wait_for_plots("probabilities")
    assert tab.loaded_images("ul.thumbs img") == 2 * TOP
    assert tab.page.locator("ul.thumbs a[href^='/test-points/']").count() == 2 * TOP
    assert "of" in tab.page.locator(".facts").inner_text()  # rank "#r of n"
    tab.screenshot("train_point")
    tab.assert_clean()


def test_mislabel_review_ranks_and_pages(tab: Tab) -> None:
    tab.goto("/mislabels?limit=24")
    assert tab.loaded_images(".ranking img") == 24
    ranks = tab.page.locator(".ranking .rank").all_inner_texts()
    assert ranks == [f"#{r}" for r in range(1, 25)]
    tab.screenshot("mislabels")
    with tab.page.expect_navigation():
        tab.page.locator(".pager a[rel=next]").first.click()
    assert query_of(tab.page.url) == {"offset": ["24"], "limit": ["24"]}
    assert tab.page.locator(".ranking .rank").first.inner_text() == "#25"
    assert tab.loaded_images(".ranking img") == 24
    tab.assert_clean()


def _wait_for_result(tab: Tab) -> None:
    tab.page.wait_for_selector("#result")
    tab.wait_for_plots("probabilities")
    assert tab.loaded_images("ul.thumbs img") == 2 * TOP
    assert tab.loaded_images("img.hero") == 1  # the upload as the model sees it (data URL)


def test_upload_with_the_file_picker_is_explained(tab: Tab) -> None:
    tab.goto("/query")
    tab.screenshot("query_form")
    with tab.page.expect_navigation():  # choosing a file submits the form
        tab.page.set_input_files("#upload-file", files=[
            {"name": "seven.png", "mimeType": "image/png", "buffer": digit_png()}])
    _wait_for_result(tab)
    assert "seven.png" in tab.page.locator("#result .facts").inner_text()
    tab.screenshot("query_result")
    tab.assert_clean()


def test_upload_by_drag_and_drop_is_explained(tab: Tab) -> None:
    tab.goto("/query")
    data = list(digit_png(size=40))
    with tab.page.expect_navigation():
        tab.page.evaluate(
            """bytes => {
                const dt = new DataTransfer();
                dt.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
                const zone = document.getElementById("dropzone");
                zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
                zone.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
            }""", data)
    _wait_for_result(tab)
    assert "dropped.png" in tab.page.locator("#result .facts").inner_text()
    tab.assert_clean()


def test_unknown_test_point_is_an_html_404_with_navigation(tab: Tab) -> None:
    tab.expected_status["/test-points/100000"] = 404
    response = tab.goto("/test-points/100000")
    assert response.status == 404
    assert tab.page.locator(".error-card .status").inner_text() == "404"
    assert tab.page.locator("header.site-header nav a").count() >= 4
    tab.screenshot("error_404")
    tab.assert_clean()
