"""Plotly figures for the pages, as pure functions: JSON-ready data in, figure dict out.

Each function returns ``{"data": [...], "layout": {...}}``, embedded in a page with
``{{ fig|tojson }}`` and drawn by ``static/dashboard.js`` with ``Plotly.newPlot``. A point whose
``customdata`` is a site path (``/...``) is a link: clicking it opens that page. Under each plot,
``data_table`` in ``templates/_macros.html`` renders the same dict as an accessible table (the
links included), and a heatmap with links gets keyboard-focusable cells. The traces used (bar,
scatter, heatmap) must be in the vendored bundle (``app.routes.assets.PLOTLY_TRACES``). Colours follow
``static/style.css``: green = helpful (negative ``I_up,loss``), red = harmful (positive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["HARMFUL", "HELPFUL", "ORDER_COLORS", "class_sum_bars", "confusion_heatmap",
           "group_changes", "group_check_scatter", "layer_share_bars", "probability_bars",
           "score_histogram"]

Figure = dict[str, Any]

HELPFUL = "#1f7a4d"
HARMFUL = "#b3261e"
ACCENT = "#2f5fb3"
NEUTRAL = "#b8c0cc"
FG = "#1d2330"
MUTED = "#5b6475"
GRID = "#e6e9ee"
ORDER_COLORS = {1: ACCENT, 2: "#c26a00"}  # group influence, first and second order
MAX_BINS = 60


def _layout(*, height: int, **extra: Any) -> dict[str, Any]:
    """The layout every figure shares: compact margins, transparent background, page font."""
    return {"height": height, "margin": {"l": 56, "r": 16, "t": 12, "b": 48},
            "paper_bgcolor": "rgba(0,0,0,0)", "plot_bgcolor": "rgba(0,0,0,0)",
            "font": {"family": "system-ui, -apple-system, 'Segoe UI', sans-serif", "size": 12,
                     "color": FG},
            "hoverlabel": {"font": {"size": 12}}, **extra}


def _axis(title: str, **extra: Any) -> dict[str, Any]:
    return {"title": {"text": title, "font": {"color": MUTED}}, "gridcolor": GRID,
            "zerolinecolor": "#c9ced6", **extra}


def confusion_heatmap(confusion: Sequence[Sequence[int]], class_names: Sequence[str], *,
                      gallery_url: str = "/test-points") -> Figure:
    """Confusion matrix as a heatmap: rows (y) the true class, columns (x) the predicted class,
    ``z`` exactly ``confusion``. Clicking cell (i, j) opens ``gallery_url?label=i&predicted=j``."""
    z = [[int(v) for v in row] for row in confusion]
    c = len(class_names)
    if len(z) != c or any(len(row) != c for row in z):
        raise ValueError(f"confusion must be {c}×{c} for {c} class names")
    names = [str(n) for n in class_names]
    links = [[f"{gallery_url}?label={i}&predicted={j}" for j in range(c)] for i in range(c)]
    heat = {
        "type": "heatmap", "z": z, "x": names, "y": names, "customdata": links,
        "colorscale": [[0.0, "#f4f6fa"], [0.02, "#dfe8f6"], [0.15, "#9db9e4"], [1.0, ACCENT]],
        "showscale": False, "xgap": 2, "ygap": 2,
        "texttemplate": "%{z}", "textfont": {"size": 11 if c <= 12 else 8},
        "hovertemplate": "true %{y} · predicted %{x}<br>%{z} test points<br>"
                         "<i>click to open them</i><extra></extra>",
    }
    size = min(560, 120 + 36 * c)
    return {"data": [heat], "layout": _layout(
        height=size,
        xaxis=_axis("predicted class", type="category", side="bottom", showgrid=False),
        yaxis=_axis("true class", type="category", autorange="reversed", showgrid=False),
    )}


def probability_bars(probabilities: Sequence[float], class_names: Sequence[str], *,
                     predicted: int, label: int | None = None) -> Figure:
    """Class probabilities as bars: the predicted class green when it is the label (or no label
    is known), red when it is wrong, with the true class then green."""
    p = [float(v) for v in probabilities]
    if len(p) != len(class_names):
        raise ValueError(f"{len(p)} probabilities for {len(class_names)} class names")
    colors = [NEUTRAL] * len(p)
    if label is not None and label != predicted:
        colors[predicted] = HARMFUL
        colors[label] = HELPFUL
    else:
        colors[predicted] = HELPFUL
    bars = {"type": "bar", "x": [str(n) for n in class_names], "y": p,
            "marker": {"color": colors},
            "hovertemplate": "class %{x}<br>p = %{y:.4f}<extra></extra>"}
    return {"data": [bars], "layout": _layout(
        height=240, xaxis=_axis("class", type="category"),
        yaxis=_axis("probability", range=[0, 1], tickformat=".0%"))}


def score_histogram(scores: Sequence[float], *, helpful_ids: Sequence[int],
                    harmful_ids: Sequence[int], bins: int | None = None,
                    train_url: str = "/train-points/{id}") -> Figure:
    """Distribution of every training point's ``I_up,loss`` (bar counts on a log axis) with the
    shown helpful and harmful points marked at their own score; a marker links to its training
    point (``train_url`` formatted with ``id``). The counts sum to ``len(scores)``."""
    s = np.asarray(scores, dtype=np.float64)  # (n_train,)
    n_bins = bins or int(np.clip(np.sqrt(s.size), 10, MAX_BINS))
    counts, edges = np.histogram(s, bins=n_bins)
    centers = (edges[:-1] + edges[1:]) / 2
    data: list[dict[str, Any]] = [{
        "type": "bar", "name": "all training points", "x": centers.tolist(),
        "y": counts.tolist(), "width": float(edges[1] - edges[0]),
        "marker": {"color": NEUTRAL, "line": {"width": 0}},
        "customdata": np.stack([edges[:-1], edges[1:]], axis=1).tolist(),
        "hovertemplate": "%{y} training points<br>scores %{customdata[0]:.4g} … "
                         "%{customdata[1]:.4g}<extra></extra>",
    }]
    for name, ids, color in (("shown helpful", helpful_ids, HELPFUL),
                             ("shown harmful", harmful_ids, HARMFUL)):
        ids = [int(i) for i in ids]
        x = s[ids] if ids else np.empty(0)
        # each marker sits on top of its bin's bar
        where = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n_bins - 1)
        data.append({
            "type": "scatter", "mode": "markers", "name": name, "x": x.tolist(),
            "y": counts[where].tolist(), "text": [f"#{i}" for i in ids],
            "customdata": [train_url.format(id=i) for i in ids],
            "marker": {"color": color, "size": 10, "symbol": "diamond",
                       "line": {"color": "#fff", "width": 1}},
            "hovertemplate": "training point %{text}<br>score %{x:+.4g}<br>"
                             "<i>click to open it</i><extra></extra>",
        })
    return {"data": data, "layout": _layout(
        height=280, bargap=0, showlegend=True,
        legend={"orientation": "h", "y": 1.12, "x": 0},
        xaxis=_axis("I_up,loss  (negative = helpful, positive = harmful)"),
        yaxis=_axis("training points", type="log"))}


def class_sum_bars(by_class: Sequence[float], class_names: Sequence[str]) -> Figure:
    """Influence summed over the training points of each class, one bar per class: ``y`` exactly
    ``by_class``, green where the sum helps (negative), red where it harms (positive)."""
    y = [float(v) for v in by_class]
    if len(y) != len(class_names):
        raise ValueError(f"{len(y)} sums for {len(class_names)} class names")
    bars = {"type": "bar", "x": [str(n) for n in class_names], "y": y,
            "marker": {"color": [HELPFUL if v < 0 else HARMFUL for v in y]},
            "hovertemplate": "training class %{x}<br>Σ I_up,loss = %{y:+.4g}<extra></extra>"}
    return {"data": [bars], "layout": _layout(
        height=240, xaxis=_axis("training class", type="category"),
        yaxis=_axis("summed I_up,loss", zeroline=True))}


def layer_share_bars(layers: Sequence[dict[str, Any]]) -> Figure:
    """Which parameter tensors up-weighting a training point moves most: one bar per layer (in
    the model's order), ``y`` exactly each layer's ``share`` of ‖I_up,params‖², its norm, size
    and largest entry on hover."""
    names = [str(layer["name"]) for layer in layers]
    bars = {"type": "bar", "x": names, "y": [float(layer["share"]) for layer in layers],
            "customdata": [[float(layer["norm"]), int(layer["numel"]), float(layer["max_abs"])]
                           for layer in layers],
            "marker": {"color": ACCENT},
            "hovertemplate": "%{x}<br>%{y:.1%} of ‖I_up,params‖²<br>norm %{customdata[0]:.4g} · "
                             "%{customdata[1]} parameters · max |entry| %{customdata[2]:.3g}"
                             "<extra></extra>"}
    return {"data": [bars], "layout": _layout(
        height=240, xaxis=_axis("parameter tensor", type="category", automargin=True),
        yaxis=_axis("share of ‖I_up,params‖²", range=[0, 1], tickformat=".0%"))}


def group_changes(by_order: Mapping[int, Sequence[dict[str, Any]]], *, sort_order: int,
                  test_url: str = "/test-points/{id}") -> Figure:
    """Predicted change of each test loss when the group is removed, one trace per order (1:
    summed influences, 2: Basu et al.), over the test points sorted by ``sort_order``'s change
    from the largest fall to the largest rise. ``x`` is the position, ``y`` exactly each order's
    ``predicted_loss_change`` in that order; a point links to its test point (``test_url``
    formatted with ``id``). Rises (the group helped) lie above zero."""
    if sort_order not in by_order:
        raise ValueError(f"sort_order {sort_order} is not among the orders {sorted(by_order)}")
    rows = sorted(by_order[sort_order],
                  key=lambda r: (float(r["predicted_loss_change"]), int(r["test_id"])))
    ids = [int(r["test_id"]) for r in rows]
    x = list(range(1, len(ids) + 1))
    data: list[dict[str, Any]] = []
    for order in sorted(by_order):
        change = {int(r["test_id"]): float(r["predicted_loss_change"]) for r in by_order[order]}
        if set(change) != set(ids):
            raise ValueError("every order must cover the same test points")
        data.append({
            "type": "scatter", "mode": "markers" if len(ids) > 60 else "lines+markers",
            "name": f"order {order}", "x": x, "y": [change[i] for i in ids],
            "text": [f"#{i}" for i in ids], "customdata": [test_url.format(id=i) for i in ids],
            "marker": {"color": ORDER_COLORS[order], "size": 5 if order == sort_order else 4,
                       "symbol": "circle" if order == 1 else "diamond"},
            "line": {"color": ORDER_COLORS[order], "width": 1},
            "hovertemplate": f"test point %{{text}}<br>order {order}: %{{y:+.4g}}<br>"
                             "<i>click to open it</i><extra></extra>"})
    return {"data": data, "layout": _layout(
        height=300, showlegend=True, legend={"orientation": "h", "y": 1.12, "x": 0},
        xaxis=_axis(f"test points, sorted by the order-{sort_order} change ({len(ids)})"),
        yaxis=_axis("predicted Δ test loss", zeroline=True))}


def group_check_scatter(results: Sequence[dict[str, Any]], *,
                        test_url: str = "/test-points/{id}") -> Figure:
    """Predicted (first and second order) against actual test-loss change when the group is
    removed and the model retrained: one trace per order (``x`` the actual changes, ``y`` the
    predictions, in the results' order) and the diagonal where a prediction is exact."""
    actual = [float(r["actual"]) for r in results]
    ids = [int(r["test_id"]) for r in results]
    data: list[dict[str, Any]] = []
    for order, key in ((1, "first_order"), (2, "second_order")):
        data.append({
            "type": "scatter", "mode": "markers", "name": f"order {order}", "x": actual,
            "y": [float(r[key]) for r in results], "text": [f"#{i}" for i in ids],
            "customdata": [test_url.format(id=i) for i in ids],
            "marker": {"color": ORDER_COLORS[order], "size": 6, "opacity": 0.75,
                       "symbol": "circle" if order == 1 else "diamond"},
            "hovertemplate": f"test point %{{text}}<br>actual %{{x:+.4g}}<br>order {order} "
                             "%{y:+.4g}<extra></extra>"})
    values = actual + data[0]["y"] + data[1]["y"]
    lo, hi = (min(values), max(values)) if values else (0.0, 0.0)
    data.append({"type": "scatter", "mode": "lines", "name": "predicted = actual", "x": [lo, hi],
                 "y": [lo, hi], "line": {"color": MUTED, "dash": "dot", "width": 1},
                 "hoverinfo": "skip"})
    return {"data": data, "layout": _layout(
        height=320, showlegend=True, legend={"orientation": "h", "y": 1.1, "x": 0},
        xaxis=_axis("actual Δ test loss (retrained without the group)", zeroline=True),
        yaxis=_axis("predicted Δ test loss", zeroline=True))}
