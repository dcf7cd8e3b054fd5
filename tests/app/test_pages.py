"""The HTML pages (app/routes/pages.py): each renders its template with the same numbers the REST
API serves, its URL reproduces the view, and bad ids or parameters give an HTML 4xx page.

A module-scoped run (CPU, float64 logreg, 90 train / 30 test 8×8 images, 3 classes) is served
through ``TestClient`` used as a context manager, so the app's lifespan opens it as the server does.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import engine
from app.main import create_app
from app.services import DEFAULT_LIMIT, DEFAULT_TOP
from app.settings import Settings

N_TRAIN, N_TEST, N_CLASSES, SIDE = 90, 30, 3, 8


def write_npz(path: Path, *, seed: int = 0) -> Path:
    """Learnable 8x8 'images' in [0, 1]: class k brightens its own band of rows."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, N_CLASSES, n)
        x = rng.uniform(0.0, 0.4, size=(n, SIDE, SIDE))
        for k in range(N_CLASSES):
            x[y == k, 2 * k : 2 * k + 3, :] += 0.5
        return np.clip(x, 0.0, 1.0), y

    x_train, y_train = split(N_TRAIN)
    x_test, y_test = split(N_TEST)
    np.savez(path, X_train=x_train, y_train=y_train, X_test=x_test, y_test=y_test)
    return path


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
         ("/mislabels", "mislabels.html"), ("/query", "query.html")]


@pytest.mark.parametrize(("url", "template"), PAGES)
def test_every_page_has_the_navigation_and_no_external_resource(client: TestClient, url: str,
                                                                template: str) -> None:
    html = page(client, url, template).text
    assert 'class="site-header"' in html
    for link in ("/", "/test-points", "/mislabels", "/query"):
        assert f'<a href="{link}"' in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # no CDN: the machine may be offline
    assert 'src="/static/dashboard.js"' in html


@pytest.mark.parametrize(("url", "template"), [p for p in PAGES if p[1] not in
                                               ("test_points.html", "mislabels.html", "query.html")])
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
