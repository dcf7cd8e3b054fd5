"""The group page, the trust panel and badge, the mislabel ranking switch, the layer chart and
the attack panel in headless Chromium: forms lead to URLs that reproduce the view, plots draw,
images load, the retraining check and the attack finish (or the attack is cancelled with its
button), and nothing logs an error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

import engine
from engine.trust import TRUST_FILE, trust_check

from .conftest import Tab

pytestmark = pytest.mark.browser

KEY = "influence.audits"  # the localStorage entry static/audit.js keeps


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def api(tab: Tab, path: str) -> Any:
    response = tab.page.request.get(tab.base + path)
    assert response.ok, path
    return response.json()


def test_group_page_class_group_plot_check_and_audit(tab: Tab) -> None:
    page = tab.page
    tab.goto("/groups")
    assert page.locator("header.site-header nav a.active").inner_text() == "Groups"
    # only the chosen selection's fields show
    assert page.locator("select[name=label]").is_visible()
    assert not page.locator("input[name=clusters]").is_visible()
    page.select_option("select[name=by]", "cluster")
    assert page.locator("input[name=clusters]").is_visible() and not page.locator("select[name=label]").is_visible()
    page.select_option("select[name=by]", "class")
    page.select_option("select[name=label]", "1")
    page.fill("input[name=fraction]", "0.1")
    with page.expect_navigation():
        page.locator("#group-form button[type=submit]").click()
    # blank and unused fields stay out of the URL
    assert query_of(page.url) == {"by": ["class"], "label": ["1"], "fraction": ["0.1"], "order": ["1"],
                                  "ihvp": ["exact"]}
    members = api(tab, "/api/v1/groups?by=class&label=1&fraction=0.1")
    assert tab.loaded_images(".group-thumbs img") == members["size"] > 0
    ids = [int(a.split("/")[-1].split("?")[0])
           for a in page.eval_on_selector_all(".group-thumbs a", "links => links.map(a => a.getAttribute('href'))")]
    assert ids == members["train_ids"][:48]
    tab.wait_for_plots("changes")
    n_test = api(tab, "/api/v1/health")["n_test"]
    lengths = page.evaluate("document.getElementById('plot-changes').data.map(t => t.y.length)")
    assert lengths == [n_test, n_test]
    assert page.locator(".summary-table tbody tr").count() == 2
    tab.screenshot("groups")

    check = page.locator("#check-link")
    with page.expect_navigation(timeout=120_000):
        check.click()
    assert query_of(page.url)["check"] == ["1"]
    tab.wait_for_plots("changes", "check")
    traces = page.evaluate("document.getElementById('plot-check').data.map(t => [t.name, t.x.length])")
    assert traces == [["order 1", n_test], ["order 2", n_test], ["predicted = actual", 2]]
    facts = page.locator(".check-facts").inner_text()
    assert "mean |error|, order 1" in facts and "mean |error|, order 2" in facts
    tab.screenshot("groups_check")

    # "Add to audit" keeps the group (static/audit.js); the first add starts an audit
    page.fill("#add-to-audit textarea[name=note]", "the first tenth of the 1s")
    page.locator("#add-to-audit button[type=submit]").click()
    page.wait_for_function("() => { const t = document.getElementById('audit-toast');"
                           " return t && !t.hidden && t.innerText.includes('group'); }")
    held = json.loads(page.evaluate(f"localStorage.getItem('{KEY}')"))
    audit = api(tab, f"/api/v1/audits/{held['current']}")
    (item,) = audit["items"]
    assert item["kind"] == "group" and item["train_ids"] == members["train_ids"]
    assert item["test_ids"] == list(range(n_test)) and item["order"] == 1
    assert item["note"] == "the first tenth of the 1s"
    tab.assert_clean()


@pytest.fixture
def no_trust(browser_run: Path) -> Iterator[Path]:
    """The served run without a trust check at first; whatever the test saves is removed after."""
    path = browser_run / TRUST_FILE
    path.unlink(missing_ok=True)
    yield browser_run
    path.unlink(missing_ok=True)


def test_trust_panel_and_badge_before_and_after_a_check(tab: Tab, no_trust: Path) -> None:
    page = tab.page
    tab.goto("/test-points/0")
    badge = page.locator(".page-title .trust-badge")
    assert "not checked" in badge.inner_text() and "unchecked" in (badge.get_attribute("class") or "")
    tab.goto("/")
    assert "Not checked yet" in page.locator("#trust").inner_text()

    trust_check(engine.open_run(no_trust), test_index=[0, 1], top=3, methods=["exact"])
    trust = api(tab, "/api/v1/trust")
    tab.goto("/")
    tab.wait_for_plots("confusion")
    rows = page.locator("#trust .trust-table tbody tr")
    assert rows.count() == 1
    row = trust["results"][0]
    assert f"{row['pearson']:.4f}" in rows.first.inner_text()
    assert trust["ground_truth"] in page.locator("#trust .facts").inner_text()
    page.locator("#trust").scroll_into_view_if_needed()
    tab.screenshot("overview_trust")
    with page.expect_navigation():
        page.locator("#trust .facts a[href^='/test-points/']").first.click()
    badge = page.locator(".page-title .trust-badge")
    assert f"Pearson {row['pearson']:.3f} (exact)" in badge.inner_text()
    assert "good" in (badge.get_attribute("class") or "")
    tab.assert_clean()


def test_mislabel_ranking_switch_keeps_the_ranking_when_paging(tab: Tab) -> None:
    page = tab.page
    tab.goto("/mislabels?limit=12")
    with page.expect_navigation():
        page.locator("nav.switch a", has_text="training loss").click()
    assert query_of(page.url) == {"limit": ["12"], "by": ["loss"]}
    ranking = api(tab, "/api/v1/self-influence?by=loss&top=12")
    assert tab.loaded_images(".ranking img") == 12
    losses = page.locator(".ranking .ranked-by .by").all_inner_texts()
    assert losses == [f"loss {t['train_loss']:.3g}" for t in ranking["items"]]
    tab.screenshot("mislabels_by_loss")
    with page.expect_navigation():
        page.locator(".pager a[rel=next]").first.click()
    assert query_of(page.url) == {"offset": ["12"], "limit": ["12"], "by": ["loss"]}
    assert page.locator(".ranking .rank").first.inner_text() == "#13"
    tab.assert_clean()


def test_training_point_layers_chart(tab: Tab) -> None:
    tab.goto("/train-points/5")
    tab.wait_for_plots("probabilities", "params")
    params = api(tab, "/api/v1/train-points/5/params")
    shares = tab.page.evaluate("document.getElementById('plot-params').data[0].y")
    assert shares == [layer["share"] for layer in params["layers"]]
    assert tab.page.locator("#params table.layer-table tbody tr").count() == len(params["layers"])
    assert tab.page.locator("#data-params table tbody tr").count() == len(params["layers"])  # the plot's
    assert "gradient norm" in tab.page.locator(".facts").first.inner_text()
    tab.page.locator("#params").scroll_into_view_if_needed()
    tab.screenshot("train_point_layers")
    tab.assert_clean()


def test_attack_panel_runs_an_attack_and_shows_the_images(tab: Tab) -> None:
    page = tab.page
    tab.goto("/test-points/0")
    tab.wait_for_plots("probabilities")
    form = page.locator("form[data-attack]")
    assert form.locator("input[name=n_points]").input_value() == "60"
    assert form.locator("input[name=epsilon]").input_value() == "0.5"
    assert form.locator("input[name=iterations]").input_value() == "10"
    form.locator("input[name=n_points]").fill("12")
    form.locator("input[name=iterations]").fill("2")
    form.locator("button[type=submit]").click()
    page.wait_for_selector(".attack-result:not([hidden]) .attack-images img", timeout=120_000)
    assert tab.loaded_images(".attack-images img") == 3 * 12  # original, δ, perturbed each
    assert page.locator(".attack-images li").count() == 12
    assert page.locator(".attack-status").inner_text().strip().startswith("done in")
    verdict = page.locator(".attack-verdict").inner_text()
    assert verdict.startswith(("Flipped", "Not flipped"))
    facts = page.locator(".attack-facts").inner_text()
    assert "ε = 0.5" in facts and "12 training images" in facts
    page.locator("#attack").scroll_into_view_if_needed()
    tab.screenshot("attack")
    tab.assert_clean()


def test_attack_cancel_button_stops_the_attack(tab: Tab) -> None:
    page = tab.page
    tab.goto("/test-points/0")
    form = page.locator("form[data-attack]")
    cancel = page.locator("#attack .attack-status button.job-cancel")
    assert cancel.is_hidden()
    # one image moved by at most 0.01 cannot flip the prediction: all 50 retrainings would run
    form.locator("input[name=n_points]").fill("1")
    form.locator("input[name=epsilon]").fill("0.01")
    form.locator("input[name=iterations]").fill("50")
    with page.expect_response(lambda r: r.url == tab.base + "/api/v1/attacks") as answer:
        form.locator("button[type=submit]").click()
    job = answer.value.json()
    try:
        text = page.locator(".attack-progress-text")
        text.filter(has_text="retraining").wait_for()
        assert cancel.is_visible() and form.locator("button[type=submit]").is_disabled()
        cancel.click()
        text.filter(has_text="Cancelled after").wait_for(timeout=60_000)
        state = api(tab, job["url"])
        assert (state["status"], state["error_kind"]) == ("error", "cancelled")
        assert state["progress"]["done"] < 50
        assert text.inner_text().startswith(f"Cancelled after {state['progress']['done']} retraining")
        assert cancel.is_hidden() and form.locator("button[type=submit]").is_enabled()
        assert page.locator(".attack-result").is_hidden()
    finally:
        page.request.delete(tab.base + job["url"])
    tab.assert_clean()


def test_group_check_box_says_when_its_job_is_gone(tab: Tab) -> None:
    # a page left open across a server restart: the job it follows is forgotten (404), and the
    # box says so instead of polling for ever (static/group_check.js on static/lib/jobs.js)
    page = tab.page
    tab.expected_status["/api/v1/jobs/gone"] = 404
    polls: list[str] = []

    def first_unanswered(route: Any) -> None:  # the server down for the first poll
        polls.append(route.request.url)
        if len(polls) == 1:
            route.abort("aborted")
        else:
            route.continue_()

    page.route(tab.base + "/api/v1/jobs/gone", first_unanswered)
    tab.goto("/groups")
    page.evaluate("""() => { const p = document.createElement('p'); p.id = 'check-job';
        p.dataset.jobId = 'gone'; p.innerHTML = 'Retraining: <span data-job-state>queued</span>';
        document.querySelector('main').append(p); }""")
    page.add_script_tag(url="/static/group_check.js")
    state = page.locator("#check-job [data-job-state]")
    state.filter(has_text="trying again").wait_for()  # not answered: it keeps following
    assert "cannot be reached" in state.inner_text()
    state.filter(has_text="no longer followed").wait_for(timeout=10_000)
    assert len(polls) == 2
    said = state.inner_text()
    assert said.startswith("no longer followed (") and "reload to look again" in said, said
    assert "gone" in said or "not found" in said.lower(), said
    tab.assert_clean()
