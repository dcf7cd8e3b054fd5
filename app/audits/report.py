"""The audit as a page: the read-only permalink view, or a self-contained HTML file (styles,
Plotly's partial bundle and images inlined) that opens from disk with no network. Each figure has
its data table beside it (``data_table`` in templates/_macros.html)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from ..routes.assets import PLOTLY_URL, plotly_bundle

__all__ = ["item_figure", "render_report"]

STATIC = Path(__file__).resolve().parents[2] / "static"
HELPFUL, HARMFUL, NEUTRAL = "#1f7a4d", "#b3261e", "#2f5fb3"


def item_figure(item: dict[str, Any], class_names: list[str]) -> dict[str, Any] | None:
    """A Plotly figure (dict) for one audit item: the scores of a test point's helpful and
    harmful training points, or a group's predicted loss change per test point."""
    def name(k: int) -> str:
        return class_names[k] if 0 <= k < len(class_names) else str(k)

    layout = {"height": 260, "margin": {"l": 50, "r": 10, "t": 30, "b": 60}, "showlegend": True,
              "legend": {"orientation": "h"}, "yaxis": {"title": {"text": "I_up,loss"}}}
    if item["kind"] == "test_point":
        traces = [{"type": "bar", "name": kind, "marker": {"color": color},
                   "x": [f"#{r['train_id']} ({name(r['label'])})" for r in item[kind]],
                   "y": [r["score"] for r in item[kind]]}
                  for kind, color in (("helpful", HELPFUL), ("harmful", HARMFUL))]
        return {"data": traces, "layout": {**layout, "title": {"text": "influence of the shown training images"}}}
    if item["kind"] == "group":
        trace = {"type": "bar", "name": "predicted loss change", "marker": {"color": NEUTRAL},
                 "x": [f"test #{r['test_id']}" for r in item["results"]],
                 "y": [r["predicted_loss_change"] for r in item["results"]]}
        return {"data": [trace], "layout": {**layout, "yaxis": {"title": {"text": "Δ test loss"}},
                                            "title": {"text": "removing the group"}}}
    return None


def _inline(text: str) -> Markup:
    """Text safe to place inside <script> or <style> (no closing tag can end it early)."""
    return Markup(text.replace("</", "<\\/"))


def render_report(templates: Jinja2Templates, audit: dict[str, Any], *, standalone: bool) -> str:
    names = audit["run"].get("class_names") or []
    figures = {str(it["id"]): fig for it in audit["items"]
               if (fig := item_figure(it, names)) is not None}
    context: dict[str, Any] = {
        "audit": audit, "class_names": names, "standalone": standalone, "figures": figures,
        "figures_json": _inline(json.dumps(figures)), "plotly_url": PLOTLY_URL,
    }
    if standalone:
        context["inline_css"] = _inline((STATIC / "style.css").read_text(encoding="utf-8"))
        context["inline_plotly"] = _inline(plotly_bundle().read_text(encoding="utf-8"))
        context["inline_report_js"] = _inline((STATIC / "report.js").read_text(encoding="utf-8"))
    return templates.get_template("audit.html").render(context)
