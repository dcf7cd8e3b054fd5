"""The page figures (app/viz.py) are pure functions of the data they are given, and show it exactly."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from app import viz

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
