"""The HTML pages (app/routes/pages.py): each renders its template with the same numbers the REST
API serves, its URL reproduces the view, and bad ids or parameters give an HTML 4xx page.

A module-scoped run (CPU, float64 logreg, 90 train / 30 test 8×8 images, 3 classes) is served
through ``TestClient`` used as a context manager, so the app's lifespan opens it as the server does.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import engine
from app.main import create_app
from app.services import DEFAULT_LIMIT, DEFAULT_TOP
from app.settings import Settings

from .conftest import N_CLASSES, N_TEST, N_TRAIN
from .conftest import write_image_npz as write_npz


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    npz = write_npz(tmp_path_factory.mktemp("data") / "images.npz")
    out = tmp_path_factory.mktemp("runs") / "logreg"
    engine.build(str(npz), "logreg", out, device="cpu", progress=False)
    with TestClient(create_app(Settings(run=out))) as c:
        yield c


def page(client: TestClient, url: str, template: str) -> Any:
    """GET an HTML page, check it rendered ``template`` with status 200, and return the response."""
    r = client.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert r.template.name == template  # type: ignore[attr-defined]
    return r


def api(client: TestClient, url: str) -> Any:
    r = client.get(url)
    assert r.status_code == 200, r.text
    return r.json()


def hrefs(html: str, prefix: str) -> list[int]:
    """Ids of the links to ``prefix{id}`` in the page, in order."""
    return [int(m) for m in re.findall(rf'href="{re.escape(prefix)}(\d+)', html)]


# ---------------------------------------------------------------------------------------------
# every page


PAGES = [("/", "overview.html"), ("/test-points", "test_points.html"),
         ("/test-points/0", "test_point.html"), ("/train-points/0", "train_point.html"),
         ("/mislabels", "mislabels.html"), ("/groups", "groups.html"), ("/query", "query.html")]


@pytest.mark.parametrize(("url", "template"), PAGES)
def test_every_page_has_the_navigation_and_no_external_resource(client: TestClient, url: str,
                                                                template: str) -> None:
    html = page(client, url, template).text
    assert 'class="site-header"' in html
    for link in ("/", "/test-points", "/mislabels", "/groups", "/query"):
        assert f'<a href="{link}"' in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # no CDN: the machine may be offline
    assert 'src="/static/dashboard.js"' in html


@pytest.mark.parametrize(("url", "template"), [p for p in PAGES if p[1] not in
                                               ("test_points.html", "mislabels.html", "query.html",
                                                "groups.html")]
                         + [("/groups?by=class&label=1", "groups.html")])
def test_pages_with_figures_load_the_local_plotly_bundle(client: TestClient, url: str,
                                                         template: str) -> None:
    html = page(client, url, template).text
    assert '<script src="/assets/plotly.min.js" defer></script>' in html
    assert "data-figure=" in html
    assert client.get("/assets/plotly.min.js").status_code == 200
    assert client.get("/static/dashboard.js").status_code == 200


def test_static_assets_are_served(client: TestClient) -> None:
    css = client.get("/static/style.css")
    assert css.status_code == 200 and "image-rendering: pixelated" in css.text


# ---------------------------------------------------------------------------------------------
# overview


def test_overview_shows_the_summary_and_its_confusion_matrix(client: TestClient) -> None:
    r = page(client, "/", "overview.html")
    summary = api(client, "/api/v1/summary")
    assert r.context["summary"] == summary
    assert r.context["confusion_fig"]["data"][0]["z"] == summary["confusion"]
    assert sum(map(sum, summary["confusion"])) == N_TEST
    assert f'{100 * summary["accuracy"]:.1f}%' in r.text
    assert summary["ihvp_report"]["method"] in r.text
    assert 'href="/mislabels"' in r.text and 'href="/query"' in r.text


def test_overview_ihvp_switches_the_report(client: TestClient) -> None:
    r = page(client, "/?ihvp=cg", "overview.html")
    assert r.context["summary"]["ihvp_report"]["method"] == "cg"
    assert r.context["summary"] == api(client, "/api/v1/summary?ihvp=cg")
    assert re.search(r'<option value="cg" selected>', r.text)


# ---------------------------------------------------------------------------------------------
# test-point gallery


@pytest.mark.parametrize("query", [
    "", "label=1", "predicted=2&limit=5", "misclassified=false&offset=3&limit=4",
    "min_confidence=0.5&max_confidence=0.9", "label=0&predicted=0",
])
def test_gallery_shows_what_the_api_lists(client: TestClient, query: str) -> None:
    r = page(client, f"/test-points?{query}", "test_points.html")
    listed = api(client, f"/api/v1/test-points?{query}")
    assert r.context["page"] == listed
    ids = [t["test_id"] for t in listed["items"]]
    assert hrefs(r.text, "/test-points/") == ids
    for i in ids:
        assert f'src="/api/v1/images/test/{i}.png"' in r.text


def test_gallery_blank_form_fields_mean_no_filter(client: TestClient) -> None:
    r = page(client, "/test-points?label=&predicted=&misclassified=&min_confidence=&max_confidence="
                     "&offset=&limit=", "test_points.html")
    assert r.context["page"] == api(client, "/api/v1/test-points")
    assert r.context["filters"] == dict.fromkeys(
        ("label", "predicted", "misclassified", "min_confidence", "max_confidence"))


def test_gallery_pagination_links_keep_the_filters(client: TestClient) -> None:
    r = page(client, "/test-points?misclassified=false&offset=4&limit=4", "test_points.html")
    total = r.context["page"]["total"]
    assert total > 8
    assert r.context["prev_url"] == "/test-points?misclassified=false&offset=0&limit=4"
    assert r.context["next_url"] == "/test-points?misclassified=false&offset=8&limit=4"
    # following the links reproduces the neighbouring views
    nxt = page(client, r.context["next_url"], "test_points.html")
    assert nxt.context["page"] == api(client, "/api/v1/test-points?misclassified=false&offset=8&limit=4")
    first = page(client, "/test-points", "test_points.html")
    assert first.context["prev_url"] is None
    assert (first.context["next_url"] is None) == (N_TEST <= DEFAULT_LIMIT)


def test_gallery_form_shows_the_current_filters(client: TestClient) -> None:
    html = page(client, "/test-points?label=2&misclassified=true&min_confidence=0.25",
                "test_points.html").text
    assert re.search(r'<select name="label">.*?<option value="2" selected>', html, re.DOTALL)
    assert '<option value="true" selected>' in html
    assert 'name="min_confidence" min="0" max="1" step="0.01" value="0.25"' in html


# ---------------------------------------------------------------------------------------------
# test-point detail


@pytest.mark.parametrize(("test_id", "query", "top", "ihvp"), [
    (0, "", DEFAULT_TOP, None), (7, "?top=4", 4, None), (12, "?top=3&ihvp=cg", 3, "cg"),
])
def test_test_point_page_equals_the_api(client: TestClient, test_id: int, query: str, top: int,
                                        ihvp: str | None) -> None:
    r = page(client, f"/test-points/{test_id}{query}", "test_point.html")
    ctx = r.context
    api_query = f"?top={top}" + (f"&ihvp={ihvp}" if ihvp else "")
    influence = api(client, f"/api/v1/test-points/{test_id}/influence{api_query}")
    scores = api(client, f"/api/v1/test-points/{test_id}/scores" + (f"?ihvp={ihvp}" if ihvp else ""))
    assert ctx["point"] == api(client, f"/api/v1/test-points/{test_id}")
    assert ctx["influence"] == influence
    assert (ctx["top"], ctx["ihvp"], ctx["method"]) == (top, ihvp, scores["ihvp"])
    assert ctx["by_class"] == scores["by_class"]

    helpful = [row["train_id"] for row in influence["helpful"]]
    harmful = [row["train_id"] for row in influence["harmful"]]
    assert len(helpful) == len(harmful) == top
    # the page links the training images in the API's order: helpful grid, then harmful grid
    assert hrefs(r.text, "/train-points/") == helpful + harmful
    for row in influence["helpful"] + influence["harmful"]:
        assert f"{row['score']:+#.4g}" in r.text

    figs = ctx["figures"]
    assert figs["probabilities"]["data"][0]["y"] == ctx["point"]["probabilities"]
    assert figs["by_class"]["data"][0]["y"] == scores["by_class"]
    bars, shown_helpful, shown_harmful = figs["histogram"]["data"]
    assert sum(bars["y"]) == N_TRAIN
    assert shown_helpful["x"] == [row["score"] for row in influence["helpful"]]
    assert shown_harmful["x"] == [row["score"] for row in influence["harmful"]]
    suffix = f"?ihvp={ihvp}" if ihvp else ""
    assert shown_helpful["customdata"] == [f"/train-points/{i}{suffix}" for i in helpful]


def test_test_point_form_reproduces_the_view(client: TestClient) -> None:
    html = page(client, "/test-points/5?top=6&ihvp=cg", "test_point.html").text
    assert '<form method="get" action="/test-points/5"' in html
    assert 'name="top" min="1" max="500" value="6"' in html
    assert '<option value="cg" selected>' in html


# ---------------------------------------------------------------------------------------------
# training point and mislabel review


@pytest.mark.parametrize(("train_id", "query"), [(0, ""), (17, "?top=3&ihvp=cg")])
def test_train_point_page_equals_the_api(client: TestClient, train_id: int, query: str) -> None:
    r = page(client, f"/train-points/{train_id}{query}", "train_point.html")
    point = api(client, f"/api/v1/train-points/{train_id}{query.replace('top=3&', '')}")
    influence = api(client, f"/api/v1/train-points/{train_id}/influence{query}")
    assert r.context["point"] == point
    assert r.context["influence"] == influence
    ids = [row["test_id"] for row in influence["helpful"] + influence["harmful"]]
    assert hrefs(r.text, "/test-points/") == ids
    assert f"#{point['rank']}</a> of {N_TRAIN}" in r.text
    assert f"{point['self_influence']:+#.4g}" in r.text
    # the rank links to the page of the ranking that holds this point
    offset = (point["rank"] - 1) // DEFAULT_LIMIT * DEFAULT_LIMIT
    assert r.context["ranking_url"].startswith(f"/mislabels?offset={offset}")


@pytest.mark.parametrize("query", ["", "?offset=10&limit=10", "?limit=7&ihvp=cg"])
def test_mislabels_page_equals_the_self_influence_ranking(client: TestClient, query: str) -> None:
    r = page(client, f"/mislabels{query}", "mislabels.html")
    ranking = api(client, "/api/v1/self-influence" + query.replace("limit=", "top="))
    assert r.context["ranking"] == ranking
    assert hrefs(r.text, "/train-points/") == [t["train_id"] for t in ranking["items"]]
    magnitudes = [abs(t["self_influence"]) for t in ranking["items"]]
    assert magnitudes == sorted(magnitudes, reverse=True)


def test_mislabels_pagination(client: TestClient) -> None:
    r = page(client, "/mislabels?offset=20&limit=20", "mislabels.html")
    assert r.context["prev_url"] == "/mislabels?offset=0&limit=20"
    assert r.context["next_url"] == "/mislabels?offset=40&limit=20"
    last = page(client, "/mislabels?offset=80&limit=20", "mislabels.html")
    assert last.context["next_url"] is None and len(last.context["ranking"]["items"]) == N_TRAIN - 80


# ---------------------------------------------------------------------------------------------
# audits from the pages: "Add to audit", "Copy link", the header widget (driven by static/audit.js)


@pytest.mark.parametrize(("url", "template"), PAGES)
def test_every_page_has_the_audit_widget(client: TestClient, url: str, template: str) -> None:
    html = page(client, url, template).text
    assert 'src="/static/audit.js"' in html and client.get("/static/audit.js").status_code == 200
    assert re.search(r'<div class="bar audit-bar" id="audit-widget" hidden>', html)
    assert 'id="audit-toast"' in html


@pytest.mark.parametrize(("url", "top", "ihvp"), [
    ("/test-points/4", DEFAULT_TOP, ""), ("/test-points/4?top=3&ihvp=cg", 3, "cg"),
    ("/test-points/4?top=250", 100, ""),  # an audit keeps at most 100 per list
])
def test_test_point_page_has_add_to_audit_and_copy_link(client: TestClient, url: str, top: int,
                                                        ihvp: str) -> None:
    html = page(client, url, "test_point.html").text
    form = re.search(r'<form class="audit-add" data-audit-add="test_point"[^>]*>', html)
    assert form is not None
    assert f'data-test-id="4" data-top="{top}" data-ihvp="{ihvp}"' in form.group(0)
    assert '<textarea name="note"' in html and 'name="audit_title"' in html
    assert 'data-copy="page"' in html and ">Copy link</button>" in html


def test_train_point_page_has_a_mislabel_form_defaulting_to_the_prediction(client: TestClient) -> None:
    r = page(client, "/train-points/17", "train_point.html")
    point, html = r.context["point"], r.text
    assert 'data-audit-add="mislabel" data-train-id="17"' in html
    options = re.findall(r'<option value="(\d+)"( selected)?>', html.split('name="suggested_label"')[1])
    assert [int(v) for v, _ in options] == list(range(N_CLASSES))
    assert [int(v) for v, sel in options if sel] == [point["predicted"]]
    assert 'name="verdict" value="mislabelled" checked' in html and 'name="verdict" value="fine"' in html
    assert '<textarea name="note"' in html and 'data-copy="page"' in html


def test_mislabel_tiles_mark_with_the_predicted_label(client: TestClient) -> None:
    r = page(client, "/mislabels?limit=30", "mislabels.html")
    marks = re.findall(r'data-audit-mark data-train-id="(\d+)" data-suggested="(\d*)"', r.text)
    items = r.context["ranking"]["items"]
    assert [int(i) for i, _ in marks] == [t["train_id"] for t in items]
    # the suggestion is the prediction where it differs from the given label, else none
    assert [s for _, s in marks] == [str(t["predicted"]) if t["predicted"] != t["label"] else ""
                                     for t in items]


def test_audit_permalink_has_hidden_edit_controls_and_the_export_none(client: TestClient) -> None:
    created = client.post("/api/v1/audits", json={"title": "pages", "items": [
        {"kind": "mislabel", "train_id": 2}]})
    assert created.status_code == 201
    slug = created.json()["slug"]
    html = client.get(f"/audits/{slug}").text
    assert f'id="audit-edit" data-slug="{slug}" hidden>' in html  # shown only to the token holder
    assert 'src="/static/audit.js"' in html and 'data-copy="page"' in html
    export = client.get(f"/audits/{slug}.html").text
    export = re.sub(r"<(style|script)>.*?</\1>", "", export, flags=re.DOTALL)  # inlined code aside
    assert "audit-edit" not in export and "audit.js" not in export and "data-copy" not in export
    assert "Training point 2" in export


# ---------------------------------------------------------------------------------------------
# upload


def png(size: int = 32, *, seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).uniform(size=(size, size)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_query_form(client: TestClient) -> None:
    r = page(client, "/query", "query.html")
    assert r.context["result"] is None and r.context["error"] is None
    assert 'enctype="multipart/form-data"' in r.text and 'type="file" name="file"' in r.text


def test_query_upload_renders_the_api_answer(client: TestClient) -> None:
    data = png()
    r = client.post("/query", files={"file": ("digit.png", data, "image/png")},
                    data={"top": "4", "ihvp": "", "label": ""})
    assert r.status_code == 200 and r.template.name == "query.html"  # type: ignore[attr-defined]
    expected = client.post("/api/v1/query?top=4", files={"file": ("digit.png", data, "image/png")})
    assert expected.status_code == 200
    result = r.context["result"]
    assert result == expected.json()
    ids = [row["train_id"] for row in result["helpful"] + result["harmful"]]
    assert len(ids) == 8
    assert hrefs(r.text, "/train-points/") == ids
    assert result["input_png"].startswith("data:image/png;base64,")
    assert f'src="{result["input_png"]}"' in r.text
    assert r.context["probabilities_fig"]["data"][0]["y"] == result["probabilities"]


def test_query_upload_options_reach_the_service(client: TestClient) -> None:
    data = png(seed=1)
    r = client.post("/query", files={"file": ("d.png", data, "image/png")},
                    data={"top": "2", "ihvp": "cg", "label": "1", "invert": "true"})
    expected = client.post("/api/v1/query?top=2&ihvp=cg&label=1&invert=true",
                           files={"file": ("d.png", data, "image/png")}).json()
    assert r.status_code == 200
    assert r.context["result"] == expected
    assert r.context["result"]["explained_class"] == 1


@pytest.mark.parametrize(("files", "status"), [
    ({"file": ("notes.txt", b"not an image", "text/plain")}, 415),
    ({"file": ("empty.png", b"", "image/png")}, 400),
    (None, 400),
])
def test_query_bad_upload_is_an_html_error(client: TestClient, files: dict | None, status: int) -> None:
    r = client.post("/query", files=files, data={"top": "3"})
    assert r.status_code == status
    assert r.headers["content-type"].startswith("text/html")
    assert r.template.name == "query.html"  # type: ignore[attr-defined]
    assert r.context["result"] is None and r.context["error"]
    assert 'role="alert"' in r.text


def test_query_bad_top_is_an_html_422(client: TestClient) -> None:
    r = client.post("/query", files={"file": ("d.png", png(), "image/png")}, data={"top": "0"})
    assert r.status_code == 422 and r.template.name == "error.html"  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("url", [
    f"/test-points/{N_TEST}", "/test-points/-1", f"/train-points/{N_TRAIN}", "/train-points/-5",
    f"/test-points/{N_TEST + 100}?top=3",
])
def test_unknown_ids_are_html_404(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("text/html")
    assert r.template.name == "error.html"  # type: ignore[attr-defined]
    assert r.context["status"] == 404 and "out of range" in r.context["detail"]
    assert 'class="site-header"' in r.text


@pytest.mark.parametrize("url", [
    "/test-points/abc", "/train-points/1.5", "/test-points/0?top=0", "/test-points/0?top=501",
    "/test-points/0?top=x", "/test-points/0?ihvp=bogus", "/train-points/0?ihvp=bogus",
    "/test-points?label=9", "/test-points?label=x", "/test-points?misclassified=maybe",
    "/test-points?min_confidence=2", "/test-points?offset=-1", "/test-points?limit=0",
    "/mislabels?limit=100000", "/mislabels?offset=-3", "/mislabels?ihvp=nope", "/?ihvp=nope",
])
def test_bad_params_are_html_4xx(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert 400 <= r.status_code < 500, (url, r.status_code)
    assert r.headers["content-type"].startswith("text/html")
    assert r.template.name == "error.html"  # type: ignore[attr-defined]
    assert r.context["status"] == r.status_code and r.context["detail"]


def test_error_detail_names_the_bad_parameter(client: TestClient) -> None:
    r = client.get("/test-points/0?top=0")
    assert r.status_code == 422 and "top" in r.context["detail"]
    r = client.get("/test-points/0?ihvp=bogus")
    assert r.status_code == 422 and "bogus" in r.context["detail"]


# ---------------------------------------------------------------------------------------------
# trust: the overview's reliability panel and the detail pages' badge (Dashboard.trust)


@pytest.fixture
def trusted(client: TestClient) -> Iterator[dict[str, Any]]:
    """A saved trust check of the served run (trust.json), removed afterwards."""
    from engine.trust import TRUST_FILE, trust_check

    run = client.app.state.run  # type: ignore[attr-defined]
    report = trust_check(run, test_index=[0, 1], top=3, methods=["exact"])
    yield report
    (run.path / TRUST_FILE).unlink()


def badge(html: str) -> str:
    found = re.search(r'<a class="trust-badge (\w+)" href="/#trust"[^>]*>(.*?)</a>', html, re.DOTALL)
    assert found is not None, "no trust badge"
    return f"{found.group(1)}: {found.group(2)}"


def test_trust_panel_and_badges_when_not_checked(client: TestClient) -> None:
    r = page(client, "/", "overview.html")
    trust = api(client, "/api/v1/trust")
    assert trust["checked"] is False
    assert r.context["trust"] == trust and r.context["trust_view"]["level"] == "unchecked"
    panel = r.text.split('id="trust"')[1]
    assert "Not checked yet" in panel and trust["how"] in panel
    for url, template in [("/test-points/3", "test_point.html"), ("/train-points/3", "train_point.html")]:
        assert badge(page(client, url, template).text).startswith("unchecked: trust: not checked (run <code>influence trust")
    upload = client.post("/query", files={"file": ("d.png", png(), "image/png")}, data={"top": "2"})
    assert badge(upload.text).startswith("unchecked:")
    assert 'class="trust-badge' not in page(client, "/query", "query.html").text  # no result, no badge


def test_trust_panel_and_badges_show_the_saved_check(client: TestClient, trusted: dict[str, Any]) -> None:
    r = page(client, "/", "overview.html")
    trust = api(client, "/api/v1/trust")
    assert trust["checked"] is True and r.context["trust"] == trust
    row = trust["results"][0]
    assert (row["method"], trust["test_ids"]) == ("exact", [0, 1])
    assert row["pearson"] == pytest.approx(trusted["results"][0]["pearson"])
    view = r.context["trust_view"]
    assert view["row"] == {**row, "level": view["level"]} and view["ground_truth"] == trust["ground_truth"]
    assert view["noisy"] == (trust["noise_floor"] > 0.2 * trust["mean_abs_actual"])
    panel = r.text.split('id="trust"')[1]
    assert f'{row["pearson"]:.4f}' in panel and f'{row["spearman"]:.4f}' in panel
    assert f'{trust["noise_floor"]:.3g}' in panel and f'{trust["mean_abs_actual"]:.3g}' in panel
    assert trust["ground_truth"] in panel and len(trust["pairs"]) == 6
    expected = f"{view['level']}: trust: Pearson {row['pearson']:.3f} (exact) vs retraining"
    for url, template in [("/test-points/3", "test_point.html"), ("/train-points/3", "train_point.html")]:
        assert badge(page(client, url, template).text).startswith(expected)
    # a method the check did not cover falls back to the best checked row, and says so by name
    assert badge(page(client, "/test-points/3?ihvp=cg", "test_point.html").text).startswith(expected)


def _trust(results: list[dict[str, Any]], *, floor: float = 0.0) -> dict[str, Any]:
    ok = [r for r in results if "pearson" in r]
    return {"checked": True, "best": max(ok, key=lambda r: r["pearson"]) if ok else None,
            "ground_truth": "exact", "noise_floor": floor, "mean_abs_actual": 1.0, "results": results}


@pytest.mark.parametrize(("pearson", "level"), [(0.95, "good"), (0.9, "good"), (0.85, "fair"),
                                                (0.7, "fair"), (0.69, "poor"), (-0.2, "poor")])
def test_trust_levels(pearson: float, level: str) -> None:
    from app.routes.pages import trust_view

    row = {"method": "exact", "damping": 0.0, "pearson": pearson, "spearman": 0.0, "seconds": 1.0}
    assert trust_view(_trust([row]), method="exact", damping=0.0)["level"] == level


def test_trust_view_picks_the_page_method_flags_noise_and_survives_errors() -> None:
    from app.routes.pages import trust_view

    rows = [{"method": "exact", "damping": 0.0, "pearson": 0.99, "spearman": 1.0, "seconds": 1.0},
            {"method": "lissa", "damping": 0.0, "pearson": 0.6, "spearman": 0.5, "seconds": 9.0},
            {"method": "cg", "damping": 0.0, "error": "singular"}]
    assert trust_view(_trust(rows), method="lissa", damping=0.0)["level"] == "poor"
    fallback = trust_view(_trust(rows), method="cg", damping=0.0)  # its row failed: the best one
    assert fallback["row"]["method"] == "exact" and not fallback["same_method"]
    assert [r["level"] for r in fallback["rows"]] == ["good", "poor", "error"]
    assert trust_view(_trust(rows, floor=0.3), method="exact")["noisy"] is True
    assert trust_view(_trust(rows, floor=0.1), method="exact")["noisy"] is False
    assert trust_view(_trust([rows[2]]), method="cg")["level"] == "failed"
    assert trust_view({"checked": False, "how": "influence trust --run r"})["level"] == "unchecked"


# ---------------------------------------------------------------------------------------------
# mislabel baselines and the training point's loss, gradient norm and layers


@pytest.mark.parametrize("by", ["self_influence", "loss", "grad_norm"])
def test_mislabels_rank_by_a_baseline_and_show_all_three_numbers(client: TestClient, by: str) -> None:
    r = page(client, f"/mislabels?by={by}&limit=12&offset=12", "mislabels.html")
    ranking = api(client, f"/api/v1/self-influence?by={by}&top=12&offset=12")
    assert r.context["ranking"] == ranking and r.context["by"] == by
    assert hrefs(r.text, "/train-points/") == [t["train_id"] for t in ranking["items"]]
    for t in ranking["items"]:
        assert f"loss {t['train_loss']:.3g}" in r.text and f"‖g‖ {t['grad_norm']:.3g}" in r.text
        assert f"{t['self_influence']:+#.4g}" in r.text
    # pagination keeps the ranking; the switch starts each ranking at its first page
    keep = "" if by == "self_influence" else f"&by={by}"
    assert r.context["prev_url"] == f"/mislabels?offset=0&limit=12{keep}"
    assert r.context["next_url"] == f"/mislabels?offset=24&limit=12{keep}"
    assert r.context["rank_urls"] == {"self_influence": "/mislabels?limit=12",
                                      "loss": "/mislabels?limit=12&by=loss",
                                      "grad_norm": "/mislabels?limit=12&by=grad_norm"}
    assert re.search(r'<a href="[^"]*"\s*class="active" aria-current="true">', r.text)
    assert "simple baselines" in r.text


def test_train_point_shows_loss_gradient_norm_and_layers(client: TestClient) -> None:
    r = page(client, "/train-points/6?ihvp=cg", "train_point.html")
    point = api(client, "/api/v1/train-points/6?ihvp=cg")
    params = api(client, "/api/v1/train-points/6/params?ihvp=cg")
    assert r.context["point"] == point and r.context["params"] == params
    assert f"{point['train_loss']:.4g}" in r.text and f"{point['grad_norm']:.4g}" in r.text
    bars = r.context["params_fig"]["data"][0]
    assert bars["x"] == [layer["name"] for layer in params["layers"]]
    assert bars["y"] == [layer["share"] for layer in params["layers"]]
    table = r.text.split('id="params"')[1]
    for layer in params["layers"]:
        assert f"<code>{layer['name']}</code>" in table and f"{layer['norm']:.4g}" in table
    assert 'href="/api/v1/train-points/6/params?ihvp=cg"' in table


@pytest.fixture(scope="module")
def projected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The same data with a projected run (K = 8): no parameter-space quantities."""
    npz = write_npz(tmp_path_factory.mktemp("pdata") / "images.npz")
    out = tmp_path_factory.mktemp("pruns") / "projected"
    engine.build(str(npz), "logreg", out, device="cpu", progress=False, ihvp="projected", project=8)
    with TestClient(create_app(Settings(run=out))) as c:
        yield c


def test_projected_run_pages_say_what_is_unavailable(projected: TestClient) -> None:
    assert projected.get("/api/v1/train-points/2/params").status_code == 422
    r = page(projected, "/train-points/2", "train_point.html")
    assert r.context["params"] is None and r.context["params_error"]
    assert "Not available for this run" in r.text.split('id="params"')[1]
    g = page(projected, "/groups?by=class&label=0&fraction=0.5&check=1", "groups.html")
    assert list(g.context["results"]) == [1] and 2 in g.context["order_errors"]
    assert g.context["checked"] is None and g.context["check_error"]
    assert "Cannot check here" in g.text and 'id="plot-changes"' in g.text


# ---------------------------------------------------------------------------------------------
# groups


def post(client: TestClient, url: str, body: dict[str, Any]) -> Any:
    r = client.post(url, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_group_page_without_a_selection_is_the_form(client: TestClient) -> None:
    r = page(client, "/groups", "groups.html")
    assert r.context["members"] is None and r.context["error"] is None
    assert '<form method="get" action="/groups"' in r.text and 'name="by"' in r.text
    assert 'id="plot-' not in r.text
    assert 'class="active" aria-current="page">Groups</a>' in r.text


@pytest.mark.parametrize(("query", "members_query", "tests", "order"), [
    ("by=class&label=1&fraction=0.5", "by=class&label=1&fraction=0.5", None, 1),
    ("by=class&label=2&order=2&test_ids=0,3 5", "by=class&label=2", [0, 3, 5], 2),
    ("by=mislabels&top=7&ihvp=cg", "by=mislabels&top=7", None, 1),
    ("by=cluster&clusters=3&cluster=1&order=2", "by=cluster&clusters=3&cluster=1", None, 2),
    ("by=cluster&clusters=4&cluster=0&fraction=0.5", "by=cluster&clusters=4&cluster=0&fraction=0.5", None, 1),
    ("by=ids&ids=5,%203,5,%2088&test_ids=1,2", None, [1, 2], 1),
])
def test_group_page_equals_the_api(client: TestClient, query: str, members_query: str | None,
                                   tests: list[int] | None, order: int) -> None:
    r = page(client, f"/groups?{query}", "groups.html")
    ctx = r.context
    ihvp = "cg" if "ihvp=cg" in query else None
    members = api(client, f"/api/v1/groups?{members_query}") if members_query else {
        "by": "ids", "train_ids": [5, 3, 88], "size": 3}
    assert ctx["members"] == members and members["size"] > 0
    tests = tests if tests is not None else list(range(N_TEST))
    body = {"train_ids": members["train_ids"], "test_ids": tests, "ihvp": ihvp}
    expected = {o: post(client, "/api/v1/group-influence", {**body, "order": o}) for o in (1, 2)}
    assert ctx["results"] == expected and ctx["form"]["order"] == order
    for o, result in expected.items():
        changes = np.array([row["predicted_loss_change"] for row in result["results"]])
        s = ctx["summaries"][o]
        assert (s["n"], s["min"], s["max"]) == (len(tests), changes.min(), changes.max())
        assert s["mean"] == pytest.approx(changes.mean()) and s["rises"] == int((changes > 0).sum())
        assert f'{s["mean_abs"]:.3g}' in r.text
    # the plot: one trace per order, test points sorted by the chosen order's change
    traces = ctx["figures"]["changes"]["data"]
    assert [t["name"] for t in traces] == ["order 1", "order 2"]
    by_id = {o: {row["test_id"]: row["predicted_loss_change"] for row in expected[o]["results"]}
             for o in (1, 2)}
    ids = [int(t[1:]) for t in traces[0]["text"]]
    assert sorted(ids) == sorted(tests)
    assert [by_id[order][i] for i in ids] == sorted(by_id[order].values())
    for o, trace in zip((1, 2), traces):
        assert trace["y"] == [by_id[o][i] for i in ids]
    suffix = "?ihvp=cg" if ihvp else ""
    assert traces[0]["customdata"][0] == f"/test-points/{ids[0]}{suffix}"
    # thumbnails: the first members, linked; the audit form carries the group
    assert hrefs(r.text, "/train-points/")[:48] == members["train_ids"][:48]
    form = re.search(r'<form class="audit-add" data-audit-add="group"[^>]*>', r.text)
    assert form is not None
    assert (f'data-train-ids="{",".join(map(str, members["train_ids"]))}" '
            f'data-test-ids="{",".join(map(str, tests))}" data-order="{order}"') in form.group(0)
    assert ctx["checked"] is None and 'id="check-link"' in r.text
    assert ctx["check_url"].endswith("&check=1") and "by=" in ctx["check_url"]


def test_group_page_shows_at_most_48_thumbnails(client: TestClient) -> None:
    r = page(client, "/groups?by=mislabels&top=60&test_ids=0", "groups.html")
    assert len(re.findall(r'<img src="/api/v1/images/train/', r.text)) == 48
    assert "and 12 more" in r.text


def test_group_check_against_retraining(client: TestClient) -> None:
    r = page(client, "/groups?by=class&label=0&fraction=0.3&test_ids=0,1,2,3,4,5&check=1", "groups.html")
    members = api(client, "/api/v1/groups?by=class&label=0&fraction=0.3")
    checked = post(client, "/api/v1/group-influence/check",
                   {"train_ids": members["train_ids"], "test_ids": [0, 1, 2, 3, 4, 5]})
    ctx = r.context
    assert {k: v for k, v in ctx["checked"].items() if k != "seconds"} == \
        {k: v for k, v in checked.items() if k != "seconds"}
    first, second, diagonal = ctx["figures"]["check"]["data"]
    assert first["x"] == second["x"] == [row["actual"] for row in checked["results"]]
    assert first["y"] == [row["first_order"] for row in checked["results"]]
    assert second["y"] == [row["second_order"] for row in checked["results"]]
    assert diagonal["x"] == diagonal["y"]
    for key in ("first_order", "second_order"):
        assert f'{checked["mean_abs_error"][key]:.3g}' in r.text
    assert f'{checked["mean_abs_actual"]:.3g}' in r.text and 'id="check-link"' not in r.text
    # the button's URL reproduces the checked view
    again = page(client, page(client, "/groups?by=class&label=0&fraction=0.3&test_ids=0,1,2,3,4,5",
                              "groups.html").context["check_url"], "groups.html")
    assert again.context["checked"]["results"] == ctx["checked"]["results"]


@pytest.mark.parametrize(("url", "status"), [
    ("/groups?by=class", 422), ("/groups?by=class&label=7", 422), ("/groups?by=ids", 422),
    ("/groups?by=ids&ids=3,x", 422), (f"/groups?by=ids&ids={N_TRAIN}", 404),
    (f"/groups?by=class&label=0&test_ids={N_TEST}", 404), ("/groups?by=cluster&clusters=3", 422),
    ("/groups?by=cluster&clusters=3&cluster=3", 422), ("/groups?by=class&label=0&ihvp=nope", 422),
])
def test_group_selection_errors_keep_the_form(client: TestClient, url: str, status: int) -> None:
    r = client.get(url)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert r.template.name == "groups.html"  # type: ignore[attr-defined]
    assert r.context["error"] and 'role="alert"' in r.text and 'action="/groups"' in r.text


@pytest.mark.parametrize("url", [
    "/groups?by=bogus", "/groups?by=class&label=0&order=3", "/groups?by=class&label=0&fraction=0",
    "/groups?by=class&label=0&fraction=1.5", "/groups?by=cluster&clusters=1&cluster=0",
    "/groups?by=class&label=x", "/groups?by=mislabels&top=0", "/groups?by=class&label=0&check=maybe",
])
def test_group_bad_params_are_html_422(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 422 and r.template.name == "error.html"  # type: ignore[attr-defined]
    assert r.headers["content-type"].startswith("text/html") and r.context["detail"]


# ---------------------------------------------------------------------------------------------
# the attack panel (static/attack.js drives it against /api/v1/attacks)


def test_test_point_page_has_the_attack_form(client: TestClient) -> None:
    html = page(client, "/test-points/4", "test_point.html").text
    form = re.search(r'<form class="attack-form" data-attack data-test-id="4"[^>]*>(.*?)</form>', html, re.DOTALL)
    assert form is not None
    from app.routes.jobs import AttackRequest

    for name in ("n_points", "epsilon", "iterations"):  # the form starts at the API's defaults
        value = AttackRequest.model_fields[name].default
        assert re.search(rf'name="{name}"[^>]*value="{value:g}"', form.group(1)), name
    assert "Koh &amp; Liang §5.2" in html and 'src="/static/attack.js"' in html
    assert client.get("/static/attack.js").status_code == 200
