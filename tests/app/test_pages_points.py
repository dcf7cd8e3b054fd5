"""The test-point and training-point pages (app/routes/pages/test_points.py, train_points.py,
query.py): the gallery, one test point, one training point, the mislabel ranking, the upload page
and the attack panel, each equal to what the REST API serves."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.limits import DEFAULT_LIMIT, DEFAULT_TOP

from .conftest import N_TEST, N_TRAIN
from .pages_common import api, hrefs, page, png, served


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with served(tmp_path_factory.mktemp("pages")) as c:
        yield c


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

# ---------------------------------------------------------------------------------------------
# upload


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
