"""The HTML pages every page shares (app/routes/pages/): navigation, the local Plotly bundle, the
audit widget, HTML errors, the overview and the trust panel and badges. Each page renders its
template with the same numbers the REST API serves; bad ids or parameters give an HTML 4xx page.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.limits import DEFAULT_TOP
from app.routes.assets import PLOTLY_URL

from .conftest import N_CLASSES, N_TEST, N_TRAIN
from .pages_common import api, page, png, served


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with served(tmp_path_factory.mktemp("pages")) as c:
        yield c


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
    assert f'<script src="{PLOTLY_URL}" defer></script>' in html
    assert "data-figure=" in html
    assert client.get(PLOTLY_URL).status_code == 200
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
    from app.views import trust_view

    row = {"method": "exact", "damping": 0.0, "pearson": pearson, "spearman": 0.0, "seconds": 1.0}
    assert trust_view(_trust([row]), method="exact", damping=0.0)["level"] == level


def test_trust_view_picks_the_page_method_flags_noise_and_survives_errors() -> None:
    from app.views import trust_view

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


