"""Keyboard and screen-reader access in headless Chromium: the confusion matrix's cells by keyboard
(Tab reaches them, the arrow keys move, Enter and Space open a cell's test points as a click does,
the focused cell is outlined over its own cell), and the data table behind each plot."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from app.routes.assets import PLOTLY_TRACES

from .conftest import Tab

CELL = """() => { const a = document.activeElement, s = getComputedStyle(a), r = a.getBoundingClientRect();
  return {inMatrix: !!a.closest('#plot-confusion .plot-keys'), row: +a.dataset.row, col: +a.dataset.col,
          label: a.getAttribute('aria-label'), outline: s.outlineStyle, width: parseFloat(s.outlineWidth),
          x: r.x + r.width / 2, y: r.y + r.height / 2}; }"""


def tab_to_matrix(page: Any) -> dict[str, Any]:
    """Press Tab from the top of the page until a cell of the confusion matrix has the focus."""
    for _ in range(80):
        page.keyboard.press("Tab")
        cell = page.evaluate(CELL)
        if cell["inMatrix"]:
            return cell
    raise AssertionError("Tab never reached the confusion matrix")


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def test_confusion_matrix_cells_open_by_keyboard(tab: Tab) -> None:
    page = tab.page
    tab.goto("/")
    tab.wait_for_plots("confusion")
    fig = page.evaluate("(({data}) => ({z: data[0].z, x: data[0].x, y: data[0].y}))"
                        "(document.getElementById('plot-confusion'))")
    n = len(fig["z"])
    assert page.locator("#plot-confusion .plot-keys a").count() == n * n
    assert page.locator('#plot-confusion .plot-keys a[tabindex="0"]').count() == 1  # one tab stop
    assert page.get_attribute("#plot-confusion", "role") == "group"  # not an image: it holds links
    # the vendored bundle has exactly the trace types the pages draw (app/routes/assets.py)
    assert page.evaluate("Object.keys(Plotly.PlotSchema.get().traces).sort()") == list(PLOTLY_TRACES)

    assert {k: tab_to_matrix(page)[k] for k in ("row", "col")} == {"row": 0, "col": 0}
    for key in ("ArrowRight", "ArrowDown", "ArrowDown", "ArrowLeft", "ArrowRight", "ArrowUp", "ArrowUp",
                "ArrowUp", "ArrowDown", "ArrowDown"):  # ArrowUp at the top row stays there
        page.keyboard.press(key)
    cell = page.evaluate(CELL)
    assert (cell["row"], cell["col"]) == (2, 1)
    assert cell["label"] == f"true class {fig['y'][2]}, predicted class {fig['x'][1]}: {fig['z'][2][1]}"
    assert cell["outline"] == "solid" and cell["width"] >= 2  # the focus is visible
    assert page.locator('#plot-confusion .plot-keys a[tabindex="0"]').count() == 1
    # the outlined cell is the heatmap's cell (true 2, predicted 1): rows top to bottom
    box = page.locator("#plot-confusion .nsewdrag").first.bounding_box()
    assert box is not None
    assert abs(cell["x"] - (box["x"] + box["width"] * 1.5 / n)) < 2
    assert abs(cell["y"] - (box["y"] + box["height"] * 2.5 / n)) < 2
    assert page.locator("#plot-confusion .hoverlayer .hovertext").count() == 1  # its hover label
    tab.screenshot("overview_matrix_keyboard")

    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert urlsplit(page.url).path == "/test-points"
    assert query_of(page.url) == {"label": ["2"], "predicted": ["1"]}

    tab.goto("/")
    tab.wait_for_plots("confusion")
    tab_to_matrix(page)
    page.keyboard.press("ArrowDown")
    page.keyboard.press("End")
    with page.expect_navigation():
        page.keyboard.press(" ")
    assert query_of(page.url) == {"label": ["1"], "predicted": [str(n - 1)]}
    tab.assert_clean()


def test_every_plot_has_a_data_table_with_its_numbers(tab: Tab) -> None:
    page = tab.page
    tab.goto("/test-points/3")
    tab.wait_for_plots("probabilities", "histogram", "by-class")
    plots = page.eval_on_selector_all("[data-figure]", "els => els.map(e => e.id.slice(5))")
    assert plots == page.eval_on_selector_all("details.data-table", "els => els.map(e => e.id.slice(5))")
    table = page.locator("#data-probabilities table")
    assert table.is_hidden()  # closed until asked for
    page.focus("#data-probabilities summary")
    page.keyboard.press("Enter")
    assert table.is_visible()
    probabilities = page.evaluate("document.getElementById('plot-probabilities').data[0].y")
    cells = table.locator("tbody td").all_inner_texts()
    assert [float(c) for c in cells] == [float(f"{p:.4g}") for p in probabilities]
    assert table.locator("caption").inner_text() == "class probabilities"
    assert table.locator("tbody th[scope=row]").count() == len(probabilities)
    tab.assert_clean()
