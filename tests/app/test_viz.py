"""The page figures (app/viz.py) are pure functions of the data they are given, and show it exactly;
their data tables (templates/_macros.html) show the same numbers; the Plotly bundle draws them."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from fastapi.testclient import TestClient
from jinja2 import Environment, FileSystemLoader

from app import viz
from app.routes.assets import PLOTLY_TRACES, PLOTLY_URL, PLOTLY_VERSION, plotly_bundle

NAMES = ["zero", "one", "two"]


def _json_roundtrip(fig: dict) -> dict:
    """Figures are embedded with ``tojson``: they must be plain, finite JSON."""
    return json.loads(json.dumps(fig, allow_nan=False))


def test_confusion_heatmap_is_the_matrix_with_links_to_the_gallery() -> None:
    confusion = [[5, 1, 0], [2, 7, 0], [0, 3, 9]]
    fig = viz.confusion_heatmap(confusion, NAMES)
    (heat,) = fig["data"]
    assert heat["type"] == "heatmap"
    assert heat["z"] == confusion
    assert heat["x"] == NAMES and heat["y"] == NAMES  # columns predicted, rows true
    assert heat["customdata"][2][1] == "/test-points?label=2&predicted=1"
    assert fig["layout"]["yaxis"]["autorange"] == "reversed"  # row 0 at the top
    assert fig["layout"]["xaxis"]["type"] == fig["layout"]["yaxis"]["type"] == "category"
    assert _json_roundtrip(fig) == fig


def test_confusion_heatmap_accepts_numpy_and_refuses_a_wrong_shape() -> None:
    c = np.arange(9).reshape(3, 3)
    assert viz.confusion_heatmap(c, NAMES)["data"][0]["z"] == c.tolist()
    with pytest.raises(ValueError, match="3×3"):
        viz.confusion_heatmap([[1, 2], [3, 4]], NAMES)


def test_figures_do_not_mutate_their_inputs_and_are_deterministic() -> None:
    confusion = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    scores = [0.5, -2.0, 3.0, 0.1, -0.2]
    before = copy.deepcopy((confusion, scores))
    figs = [viz.confusion_heatmap(confusion, NAMES),
            viz.score_histogram(scores, helpful_ids=[1], harmful_ids=[2]),
            viz.class_sum_bars([1.0, -2.0, 0.5], NAMES),
            viz.probability_bars([0.2, 0.5, 0.3], NAMES, predicted=1, label=2)]
    again = [viz.confusion_heatmap(confusion, NAMES),
             viz.score_histogram(scores, helpful_ids=[1], harmful_ids=[2]),
             viz.class_sum_bars([1.0, -2.0, 0.5], NAMES),
             viz.probability_bars([0.2, 0.5, 0.3], NAMES, predicted=1, label=2)]
    assert figs == again
    assert (confusion, scores) == before
    for fig in figs:
        assert set(fig) == {"data", "layout"}
        assert _json_roundtrip(fig) == fig


@pytest.mark.parametrize(("predicted", "label", "colors"), [
    (1, 1, [viz.NEUTRAL, viz.HELPFUL, viz.NEUTRAL]),      # right: the prediction is green
    (1, 2, [viz.NEUTRAL, viz.HARMFUL, viz.HELPFUL]),      # wrong: prediction red, label green
    (0, None, [viz.HELPFUL, viz.NEUTRAL, viz.NEUTRAL]),   # an upload has no label
])
def test_probability_bars(predicted: int, label: int | None, colors: list[str]) -> None:
    p = np.array([0.6, 0.3, 0.1])
    (bars,) = viz.probability_bars(p, NAMES, predicted=predicted, label=label)["data"]
    assert bars["y"] == p.tolist()
    assert bars["x"] == NAMES
    assert bars["marker"]["color"] == colors
    with pytest.raises(ValueError):
        viz.probability_bars([0.5, 0.5], NAMES, predicted=0)


def test_score_histogram_counts_every_score_and_marks_the_shown_ids() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=500)
    helpful = np.argsort(scores)[:5].tolist()
    harmful = np.argsort(-scores)[:5].tolist()
    fig = viz.score_histogram(scores.tolist(), helpful_ids=helpful, harmful_ids=harmful,
                              train_url="/train-points/{id}?ihvp=cg")
    bars, shown_helpful, shown_harmful = fig["data"]
    assert sum(bars["y"]) == scores.size
    edges = np.array([lo for lo, _ in bars["customdata"]] + [bars["customdata"][-1][1]])
    assert edges[0] == scores.min() and edges[-1] == scores.max()
    for trace, ids, color in ((shown_helpful, helpful, viz.HELPFUL), (shown_harmful, harmful, viz.HARMFUL)):
        assert trace["x"] == scores[ids].tolist()
        assert trace["text"] == [f"#{i}" for i in ids]
        assert trace["customdata"] == [f"/train-points/{i}?ihvp=cg" for i in ids]
        assert trace["marker"]["color"] == color
        # each marker sits on its own bin's bar, so it is never below the log axis
        for x, y in zip(trace["x"], trace["y"]):
            b = min(int(np.searchsorted(edges, x, side="right")) - 1, len(bars["y"]) - 1)
            assert y == bars["y"][b] >= 1
    assert fig["layout"]["yaxis"]["type"] == "log"


def test_score_histogram_edge_cases() -> None:
    fig = viz.score_histogram([0.0, 0.0, 0.0], helpful_ids=[], harmful_ids=[0], bins=4)
    bars, helpful, harmful = fig["data"]
    assert sum(bars["y"]) == 3 and len(bars["y"]) == 4
    assert helpful["x"] == [] and harmful["x"] == [0.0] and harmful["y"] == [3]


def test_class_sum_bars_are_the_per_class_sums_coloured_by_sign() -> None:
    rng = np.random.default_rng(1)
    scores, labels = rng.normal(size=60), rng.integers(0, 3, 60)
    by_class = np.bincount(labels, weights=scores, minlength=3)
    (bars,) = viz.class_sum_bars(by_class.tolist(), NAMES)["data"]
    assert bars["y"] == by_class.tolist()
    assert bars["x"] == NAMES
    assert bars["marker"]["color"] == [viz.HELPFUL if v < 0 else viz.HARMFUL for v in by_class]
    with pytest.raises(ValueError):
        viz.class_sum_bars([1.0], NAMES)


# ---------------------------------------------------------------------------------------------
# training-point layers and group influence


LAYERS = [{"name": "0.weight", "shape": [4, 3], "numel": 12, "norm": 3.0, "max_abs": 2.0, "rms": 0.9,
           "share": 0.9}, {"name": "0.bias", "shape": [4], "numel": 4, "norm": 1.0, "max_abs": 0.7,
                           "rms": 0.5, "share": 0.1}]


def test_layer_share_bars_are_the_shares_in_model_order() -> None:
    before = copy.deepcopy(LAYERS)
    fig = viz.layer_share_bars(LAYERS)
    (bars,) = fig["data"]
    assert bars["x"] == ["0.weight", "0.bias"] and bars["y"] == [0.9, 0.1]
    assert bars["customdata"] == [[3.0, 12, 2.0], [1.0, 4, 0.7]]
    assert fig["layout"]["yaxis"]["range"] == [0, 1] and fig["layout"]["xaxis"]["type"] == "category"
    assert LAYERS == before and _json_roundtrip(fig) == fig


def _changes(values: dict[int, float]) -> list[dict]:
    return [{"test_id": t, "influence": -v, "predicted_loss_change": v} for t, v in values.items()]


def test_group_changes_sorts_by_the_chosen_order_and_keeps_each_orders_values() -> None:
    first = _changes({0: 0.3, 1: -0.1, 2: 0.0, 3: 0.2})
    second = _changes({0: 0.25, 1: -0.2, 2: 0.05, 3: 0.4})
    before = copy.deepcopy((first, second))
    fig = viz.group_changes({1: first, 2: second}, sort_order=2, test_url="/test-points/{id}?ihvp=cg")
    one, two = fig["data"]
    assert (one["name"], two["name"]) == ("order 1", "order 2")
    assert two["text"] == one["text"] == ["#1", "#2", "#0", "#3"]  # by the order-2 change, rising
    assert two["y"] == [-0.2, 0.05, 0.25, 0.4] and one["y"] == [-0.1, 0.0, 0.3, 0.2]
    assert one["x"] == two["x"] == [1, 2, 3, 4]
    assert one["customdata"][0] == "/test-points/1?ihvp=cg"
    assert (one["marker"]["color"], two["marker"]["color"]) == (viz.ORDER_COLORS[1], viz.ORDER_COLORS[2])
    assert fig["layout"]["yaxis"]["zeroline"] is True
    assert (first, second) == before and _json_roundtrip(fig) == fig
    # one order alone (a projected run has no order 2); ties break by test id
    (only,) = viz.group_changes({1: _changes({5: 0.1, 2: 0.1, 9: -1.0})}, sort_order=1)["data"]
    assert only["text"] == ["#9", "#2", "#5"] and only["customdata"][0] == "/test-points/9"


def test_group_changes_refuses_inconsistent_orders() -> None:
    with pytest.raises(ValueError, match="sort_order"):
        viz.group_changes({1: _changes({0: 0.1})}, sort_order=2)
    with pytest.raises(ValueError, match="same test points"):
        viz.group_changes({1: _changes({0: 0.1}), 2: _changes({1: 0.1})}, sort_order=1)


def test_group_check_scatter_is_predicted_against_actual_with_the_diagonal() -> None:
    rows = [{"test_id": 4, "first_order": 0.1, "second_order": 0.15, "actual": 0.2},
            {"test_id": 7, "first_order": -0.3, "second_order": -0.25, "actual": -0.2}]
    fig = viz.group_check_scatter(rows, test_url="/test-points/{id}")
    first, second, diagonal = fig["data"]
    assert first["x"] == second["x"] == [0.2, -0.2]
    assert first["y"] == [0.1, -0.3] and second["y"] == [0.15, -0.25]
    assert first["customdata"] == ["/test-points/4", "/test-points/7"] and first["text"] == ["#4", "#7"]
    assert diagonal["x"] == diagonal["y"] == [-0.3, 0.2]  # spans every value shown
    assert diagonal["hoverinfo"] == "skip" and fig["layout"]["showlegend"] is True
    assert _json_roundtrip(fig) == fig


# ---------------------------------------------------------------------------------------------
# the data table behind every figure (templates/_macros.html data_table), rendered without a server

ROOT = Path(__file__).resolve().parents[2]
ENV = Environment(loader=FileSystemLoader(ROOT / "templates"), autoescape=True)
Cell = tuple[str, str, str | None]  # (th | td, text, link)


class _Table(HTMLParser):
    """Rows of the first table in some HTML: per cell its tag, text and link (None without)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: list[list[Cell]] = []
        self.caption, self._cell, self._in_caption = "", None, False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td"):
            self._cell = [tag, "", None]
        elif tag == "a" and self._cell is not None:
            self._cell[2] = dict(attrs)["href"]
        self._in_caption = self._in_caption or tag == "caption"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td") and self._cell is not None:
            self.rows[-1].append((self._cell[0], self._cell[1].strip(), self._cell[2]))
            self._cell = None
        self._in_caption = self._in_caption and tag != "caption"

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1] += data
        elif self._in_caption:
            self.caption += data


def data_table(fig: dict, *, links: bool = True) -> _Table:
    html = ENV.from_string('{% import "_macros.html" as m %}{{ m.data_table(fig, "what it shows", '
                           '"data-x", links=links) }}').render(fig=fig, links=links)
    assert '<details class="data-table" id="data-x">' in html and "<summary>Data table</summary>" in html
    table = _Table(html)
    assert table.caption == "what it shows"
    return table


def texts(rows: list[list[Cell]]) -> list[list[str]]:
    return [[text for _, text, _ in row] for row in rows]


def test_confusion_table_is_the_matrix_with_row_and_column_headers_and_cell_links() -> None:
    confusion = [[5, 1, 0], [2, 7, 0], [0, 3, 9]]
    head, *rows = data_table(viz.confusion_heatmap(confusion, NAMES)).rows
    assert texts([head]) == [["true class (rows) / predicted class (columns)", *NAMES]]
    assert all(tag == "th" for tag, _, _ in head)
    assert [row[0][:2] for row in rows] == [("th", n) for n in NAMES]  # a row header per true class
    assert [[int(text) for _, text, _ in row[1:]] for row in rows] == confusion
    assert rows[2][2][2] == "/test-points?label=2&predicted=1"  # the cell a click opens
    assert all(link is None for row in data_table(viz.confusion_heatmap(confusion, NAMES),
                                                  links=False).rows for _, _, link in row)


def test_traces_sharing_x_are_one_row_per_x_with_a_column_per_trace() -> None:
    fig = viz.group_changes({1: _changes({3: 0.1, 4: -0.2, 9: 0.05}),
                             2: _changes({3: 0.15, 4: -0.1, 9: 0.5})}, sort_order=1)
    head, *rows = data_table(fig).rows
    assert texts([head]) == [["test points, sorted by the order-1 change (3)", "point",
                              "predicted Δ test loss: order 1", "predicted Δ test loss: order 2"]]
    assert texts(rows) == [["1", "#4", "-0.2", "-0.1"], ["2", "#9", "0.05", "0.5"],
                           ["3", "#3", "0.1", "0.15"]]
    assert [row[1][2] for row in rows] == ["/test-points/4", "/test-points/9", "/test-points/3"]


def test_one_trace_is_its_x_and_y_and_a_reference_line_is_left_out() -> None:
    head, *rows = data_table(viz.probability_bars([0.25, 0.5, 0.25], NAMES, predicted=1)).rows
    assert texts([head, *rows]) == [["class", "probability"], ["zero", "0.25"], ["one", "0.5"],
                                    ["two", "0.25"]]
    results = [{"test_id": 5, "actual": 0.5, "first_order": 0.4, "second_order": 0.45},
               {"test_id": 6, "actual": -0.25, "first_order": -0.5, "second_order": -0.2}]
    head, *rows = data_table(viz.group_check_scatter(results)).rows
    assert len(head) == 4 and head[2][1].endswith("order 1") and head[3][1].endswith("order 2")
    assert texts(rows) == [["0.5", "#5", "0.4", "0.45"], ["-0.25", "#6", "-0.5", "-0.2"]]


def test_traces_with_their_own_x_are_a_row_per_point_named_by_trace() -> None:
    s = np.array([0.3, -0.2, 0.05, 0.1, -0.05])
    fig = viz.score_histogram(s, helpful_ids=[1], harmful_ids=[0, 3], bins=4)
    head, *rows = data_table(fig).rows
    assert texts([head])[0][0] == "series" and len(rows) == 4 + 3
    bars = fig["data"][0]
    assert [int(r[2][1]) for r in rows[:4]] == bars["y"] and sum(bars["y"]) == s.size
    assert [(r[0][1], float(r[1][1]), r[3][1], r[3][2]) for r in rows[4:]] == [
        ("shown helpful", -0.2, "#1", "/train-points/1"), ("shown harmful", 0.3, "#0", "/train-points/0"),
        ("shown harmful", 0.1, "#3", "/train-points/3")]


def test_every_figure_a_page_draws_uses_only_traces_in_the_vendored_bundle() -> None:
    figures = [viz.confusion_heatmap([[1, 0], [0, 1]], NAMES[:2]),
               viz.probability_bars([0.5, 0.5], NAMES[:2], predicted=0),
               viz.score_histogram([0.1, 0.2], helpful_ids=[0], harmful_ids=[1]),
               viz.class_sum_bars([0.1, -0.1], NAMES[:2]),
               viz.layer_share_bars([{"name": "w", "share": 1.0, "norm": 1.0, "numel": 2, "max_abs": 1.0}]),
               viz.group_changes({1: _changes({0: 0.1})}, sort_order=1),
               viz.group_check_scatter([{"test_id": 0, "actual": 0.1, "first_order": 0.1,
                                         "second_order": 0.1}])]
    used = {trace["type"] for fig in figures for trace in fig["data"]}
    assert used == set(PLOTLY_TRACES)  # what the bundle has: no more, no less
    head = plotly_bundle().read_text(encoding="utf-8")[:200]
    assert f"plotly.js (bar, heatmap, scatter - minified) v{PLOTLY_VERSION}" in head


# ---------------------------------------------------------------------------------------------
# served: the versioned bundle, a table behind every figure, what a browser downloads

PAGES_WITH_FIGURES = ["/", "/test-points/0", "/train-points/0", "/groups?by=class&label=1"]
MB = 1_000_000


def _page_weight() -> ModuleType:
    spec = importlib.util.spec_from_file_location("page_weight", ROOT / "bench" / "page_weight.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bundle_has_a_versioned_immutable_url_and_the_old_url_still_answers(client: TestClient) -> None:
    new = client.get(PLOTLY_URL)
    assert new.status_code == 200 and new.headers["content-type"].startswith("text/javascript")
    assert new.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert new.content == plotly_bundle().read_bytes() and len(new.content) < 1.25 * MB
    old = client.get("/assets/plotly.min.js")
    assert old.content == new.content and "immutable" not in old.headers["cache-control"]


@pytest.mark.parametrize("url", PAGES_WITH_FIGURES)
def test_every_figure_on_a_page_has_its_data_table_and_loads_the_versioned_bundle(
        client: TestClient, url: str) -> None:
    html = client.get(url).text
    plots = re.findall(r'<div class="plot" id="plot-([\w-]+)"[^>]*data-figure=', html)
    assert plots and re.findall(r'<details class="data-table" id="data-([\w-]+)">', html) == plots
    assert f'<script src="{PLOTLY_URL}" defer></script>' in html and "plotly.min.js" not in html


@pytest.mark.parametrize("url", PAGES_WITH_FIGURES)
def test_a_page_with_its_scripts_and_styles_is_under_1_mb_compressed(client: TestClient, url: str) -> None:
    weight = _page_weight().page_weight(client, url)
    urls = [part["url"] for part in weight["parts"]]
    assert PLOTLY_URL in urls and "/static/audit.js" in urls and "/static/style.css" in urls
    assert weight["raw"] > plotly_bundle().stat().st_size  # the bundle is counted, uncompressed
    assert weight["gzip"] < MB  # the full plotly.js alone was 4.8 MB raw, 1.47 MB compressed


def test_the_audit_export_inlines_the_partial_bundle_and_a_table_per_figure(client: TestClient) -> None:
    items = [{"kind": "test_point", "test_id": 0, "top": 5},
             {"kind": "group", "train_ids": [1, 2, 3], "test_ids": [0, 1, 2, 3]},
             {"kind": "mislabel", "train_id": 2}]
    created = client.post("/api/v1/audits", json={"title": "weight", "items": items})
    assert created.status_code == 201
    slug = created.json()["slug"]
    export = client.get(f"/audits/{slug}.html").text
    assert "plotly.js (bar, heatmap, scatter - minified)" in export and len(export.encode()) < 1.5 * MB
    tables = re.findall(r'<details class="data-table" id="data-(\d+)">.*?</details>', export, flags=re.DOTALL)
    assert len(tables) == 2  # the test point's and the group's figures; a mislabel has none
    assert "href=" not in "".join(re.findall(r"<details.*?</details>", export, flags=re.DOTALL))
    head, *rows = _Table(export.split('id="data-')[2]).rows  # the group: a row per test point
    assert len(rows) == 4 and texts([head]) == [["x", "Δ test loss"]]
    permalink = client.get(f"/audits/{slug}").text
    assert f'<script src="{PLOTLY_URL}"></script>' in permalink and permalink.count("<details") == 2
