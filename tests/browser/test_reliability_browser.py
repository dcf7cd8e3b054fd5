"""The overview's reliability panel in headless Chromium: the saved LDS with its 95% CI, interval
bar and published references, the mislabel AUC/recall table and the brittleness summary; the
"Compute LDS" button runs a background job, shows its progress and puts the new result in the
panel without a page load; its Cancel button stops the job (the form then starts it again) and a
refused cancel says why; nothing logs an error.

A run of its own (90 train / 30 test 8×8 images, logreg, 10% of the training labels flipped and
recorded), so that the mislabel check has flips to find; its LDS and checks computed by the engine
before the page is opened."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import engine
from engine.brittle import brittleness
from engine.lds import lds, load_lds
from engine.mislabel import load_mislabel, mislabel_check
from tests.app.conftest import write_image_npz

from .conftest import Tab, open_tab, serving

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def checked_run(tmp_path_factory: pytest.TempPathFactory) -> engine.Run:
    npz = write_image_npz(tmp_path_factory.mktemp("reliability-data") / "images.npz")
    run = engine.build(str(npz), "logreg", tmp_path_factory.mktemp("reliability-runs") / "noisy",
                       device="cpu", progress=False, label_noise=0.1)
    lds(run, subsets=3, tests=5)
    mislabel_check(run)
    brittleness(run, test_index=[0, 1], max_k=4)
    return run


@pytest.fixture(scope="module")
def base(checked_run: engine.Run) -> Iterator[str]:
    with serving(checked_run.path) as url:
        yield url


@pytest.fixture
def rtab(browser: Any, base: str, screenshot_dirs: list[Path]) -> Iterator[Tab]:
    with open_tab(browser, base, screenshot_dirs) as t:
        yield t


def test_panel_shows_lds_mislabels_and_brittleness(rtab: Tab, checked_run: engine.Run) -> None:
    page = rtab.page
    rtab.goto("/")
    saved = load_lds(checked_run)[0]
    row = page.locator("#lds tr.lds-row").first
    assert row.locator(".lds-value").inner_text() == f"{saved['lds']:.3f}"
    assert row.locator(".lds-ci").inner_text() == f"{saved['ci95'][0]:.3f}–{saved['ci95'][1]:.3f}"
    bar = row.locator(".lds-bar")
    assert f"95% CI {saved['ci95'][0]:.2f} to {saved['ci95'][1]:.2f}" in bar.get_attribute("aria-label")
    assert bar.locator(".lds-ci-bar").bounding_box()["width"] > 0
    refs = [r.get_attribute("title") for r in bar.locator(".lds-ref").all()]
    assert any("one checkpoint: ≈ 0.1" in t for t in refs) and any("MNIST: ≈ 0.8" in t for t in refs)
    assert row.locator(".lds-retraining").inner_text() == "to the optimum"
    # the panel spans the page as the trust check above it does
    trust_box, lds_box = page.locator("#trust").bounding_box(), page.locator("#lds").bounding_box()
    assert (lds_box["x"], lds_box["width"]) == (trust_box["x"], trust_box["width"])
    assert lds_box["y"] > trust_box["y"] + trust_box["height"]
    assert page.locator("#lds-title .lds-badge").inner_text() == f"{saved['lds']:.2f}"
    headers = page.locator("#lds thead th").all_inner_texts()
    assert headers[:3] == ["IHVP method", "LDS", "95% CI"]
    assert f"influence lds --run {checked_run.path}" in page.locator("#lds-command").inner_text()

    table = page.locator("table.mislabel-table")
    assert table.locator("thead th").all_inner_texts() == ["score", "AUC", "top 1%", "top 5%", "top 10%", "top 20%"]
    report = load_mislabel(checked_run)
    for tr, s in zip(table.locator("tbody tr").all(), report["scores"], strict=True):
        cells = tr.locator("th, td").all_inner_texts()
        assert cells[0] == s["score"].replace("_", " ") and cells[1] == f"{s['auc']:.3f}"
        assert cells[4] == f"{100 * s['recall']['10']:.1f}%"

    assert page.locator("table.brittle-table tbody tr").count() == 2
    assert "Median k:" in page.locator(".brittle-median").inner_text()
    rtab.screenshot("overview_reliability")
    rtab.assert_clean()


def test_compute_lds_button_runs_a_job_and_updates_the_panel(rtab: Tab, checked_run: engine.Run) -> None:
    page = rtab.page
    rtab.goto("/")
    before = page.locator("#lds tr.lds-row").count()
    form = page.locator("form.lds-form")
    form.locator("input[name=subsets]").fill("3")
    form.locator("input[name=tests]").fill("5")
    form.locator("select[name=output]").select_option("margin")
    status = page.locator("#lds .job-status")
    assert status.get_attribute("aria-live") == "polite" and status.get_attribute("role") == "status"
    url = page.url
    form.locator("button[type=submit]").click()
    assert form.locator("button[type=submit]").is_disabled() or "Done" in status.inner_text()
    page.wait_for_function("() => document.querySelector('#lds .job-status .job-text')"
                           ".textContent.startsWith('Done')", timeout=180_000)
    assert page.url == url  # the panel was refreshed in place, not by a navigation
    assert not form.locator("button[type=submit]").is_disabled()
    assert page.locator("#lds tr.lds-row").count() == before + 1
    margin = next(r for r in load_lds(checked_run) if r["output"] == "margin")
    assert page.locator("#lds-results").get_by_text(f"{margin['ci95'][0]:.3f}–{margin['ci95'][1]:.3f}").count() >= 1
    assert page.locator("#lds .job-status progress").evaluate("p => p.value === p.max")
    rtab.screenshot("overview_lds_job")
    rtab.assert_clean()


def test_a_refused_lds_request_says_why(rtab: Tab) -> None:
    page = rtab.page
    rtab.goto("/")
    rtab.expected_status["/api/v1/lds"] = 422
    form = page.locator("form.lds-form")
    form.locator("input[name=tests]").evaluate("i => { i.max = 999; i.value = 999; }")  # past the run's 30
    form.locator("button[type=submit]").click()
    text = page.locator("#lds .job-status .job-text")
    text.filter(has_text="Could not start").wait_for()
    assert "test points" in text.inner_text() and "HTTP 422" in text.inner_text()
    assert page.locator("#lds .job-status").get_attribute("class") == "job-status error"
    rtab.assert_clean()


# ------------------------------------------------------------------------------ cancelling a job
SLOW_SUBSETS = 400  # about a second a retraining on this run: minutes in all, so a cancel always lands first
TEXTS = "#lds .job-status .job-text"


def record_texts(page: Any) -> None:
    """Keep every text the LDS status line shows in ``window.shownTexts`` (states that pass quickly
    included), so a test can check their order instead of racing the poller."""
    page.evaluate("sel => { const t = document.querySelector(sel); window.shownTexts = [];"
                  " new MutationObserver(() => window.shownTexts.push(t.textContent))"
                  ".observe(t, {childList: true, characterData: true, subtree: true}); }", TEXTS)


def start_slow_lds(rtab: Tab) -> dict[str, Any]:
    """Submit the LDS form with SLOW_SUBSETS and wait until the job retrains; the job the POST answered."""
    page = rtab.page
    form = page.locator("form.lds-form")
    form.locator("input[name=subsets]").fill(str(SLOW_SUBSETS))
    form.locator("input[name=tests]").fill("5")
    with page.expect_response(lambda r: r.url == rtab.base + "/api/v1/lds") as answer:
        form.locator("button[type=submit]").click()
    job = answer.value.json()
    assert answer.value.status == 202 and job["status"] in ("queued", "running")
    page.locator(TEXTS).filter(has_text="Retraining:").wait_for()
    return job


def job_state(rtab: Tab, job_id: str) -> dict[str, Any]:
    response = rtab.page.request.get(f"{rtab.base}/api/v1/jobs/{job_id}")
    assert response.ok
    return response.json()


def cancel_quietly(rtab: Tab, *jobs: dict[str, Any]) -> None:
    """Leave no retraining behind for the module's next tests (a finished job is unchanged)."""
    for job in jobs:
        rtab.page.request.delete(f"{rtab.base}/api/v1/jobs/{job['id']}")


def test_cancel_button_stops_the_lds_job_and_the_form_starts_it_again(rtab: Tab) -> None:
    page = rtab.page
    rtab.goto("/")
    rows = page.locator("#lds tr.lds-row").count()
    submit = page.locator("form.lds-form button[type=submit]")
    cancel = page.locator("#lds .job-status button.job-cancel")
    assert cancel.is_hidden()
    record_texts(page)
    first = start_slow_lds(rtab)
    second: dict[str, Any] = {"id": first["id"]}
    try:
        assert cancel.is_visible() and cancel.is_enabled() and submit.is_disabled()
        rtab.screenshot("overview_lds_running")
        cancel.click()
        page.locator(TEXTS).filter(has_text="Cancelled after").wait_for()
        job = job_state(rtab, first["id"])
        assert (job["status"], job["error_kind"]) == ("error", "cancelled")
        done, total = job["progress"]["done"], job["progress"]["total"]
        assert total == SLOW_SUBSETS and done < total
        shown = page.evaluate("() => window.shownTexts")
        cancelling, cancelled = shown.index("Cancelling…"), len(shown) - 1
        assert cancelling < cancelled and all(t == "Cancelling…" for t in shown[cancelling:cancelled])
        assert shown[-1] == (f"Cancelled after {done} of {SLOW_SUBSETS} retrainings. The retrained subsets "
                             "are kept: the same settings resume from them.")
        assert page.locator("#lds .job-status").get_attribute("class") == "job-status"  # not an error
        assert cancel.is_hidden() and submit.is_enabled()
        assert page.locator("#lds tr.lds-row").count() == rows  # nothing saved
        rtab.screenshot("overview_lds_cancelled")

        # the form is usable again: the same settings start a new job, which resumes from the cache
        second = start_slow_lds(rtab)
        assert second["id"] != first["id"]
        assert cancel.is_visible() and cancel.is_enabled()
        assert job_state(rtab, second["id"])["progress"]["done"] >= done
        cancel.click()
        page.locator(TEXTS).filter(has_text="Cancelled after").wait_for()
        assert job_state(rtab, second["id"])["error_kind"] == "cancelled"
        assert cancel.is_hidden() and submit.is_enabled()
    finally:
        cancel_quietly(rtab, first, second)
    rtab.assert_clean()


def test_a_refused_cancel_says_why_and_can_be_tried_again(rtab: Tab) -> None:
    page = rtab.page
    rtab.goto("/")
    job = start_slow_lds(rtab)
    try:
        # the job is forgotten by the time the DELETE arrives: the real server answers 404
        path, gone = f"/api/v1/jobs/{job['id']}", "/api/v1/jobs/no-such-job"
        rtab.expected_status.update({path: 404, gone: 404})

        def forget(route: Any) -> None:
            if route.request.method == "DELETE":
                route.continue_(url=rtab.base + gone)
            else:
                route.continue_()

        page.route(rtab.base + path, forget)
        cancel = page.locator("#lds .job-status button.job-cancel")
        cancel.click()
        text = page.locator(TEXTS)
        text.filter(has_text="Could not cancel").wait_for()
        message = text.inner_text()
        assert message.startswith("Could not cancel the job: not found (HTTP 404): no job 'no-such-job'")
        assert "\n" not in message
        assert page.locator("#lds .job-status").get_attribute("class") == "job-status error"
        assert cancel.is_visible() and cancel.is_enabled()
        # the job goes on: the bar moves, and the message stays until the next try
        seen = page.locator("#lds .job-status progress").evaluate("p => p.value")
        page.wait_for_function("v => document.querySelector('#lds .job-status progress').value > v", arg=seen)
        assert text.inner_text() == message
        assert job_state(rtab, job["id"])["status"] == "running"

        page.unroute(rtab.base + path)
        cancel.click()
        text.filter(has_text="Cancelled after").wait_for()
        assert job_state(rtab, job["id"])["error_kind"] == "cancelled"
        assert page.locator("#lds .job-status").get_attribute("class") == "job-status"
    finally:
        cancel_quietly(rtab, job)
    rtab.assert_clean()


def test_cancel_button_stops_the_brittleness_search(rtab: Tab) -> None:
    page = rtab.page
    rtab.goto("/")
    rows = page.locator("table.brittle-table tbody tr").count()
    form = page.locator("#brittleness form")
    cancel = page.locator("#brittleness .job-status button.job-cancel")
    text = page.locator("#brittleness .job-status .job-text")
    assert cancel.is_hidden()
    form.locator("input[name=tests]").fill("30")  # about 4 retrainings each: minutes, the cancel lands first
    with page.expect_response(lambda r: r.url == rtab.base + "/api/v1/brittleness") as answer:
        form.locator("button[type=submit]").click()
    job = answer.value.json()
    try:
        text.filter(has_text="Retraining:").wait_for()
        assert cancel.is_visible() and cancel.is_enabled()
        cancel.click()
        text.filter(has_text="Cancelled after").wait_for()
        state = job_state(rtab, job["id"])
        assert (state["status"], state["error_kind"]) == ("error", "cancelled")
        done, total = state["progress"]["done"], state["progress"]["total"]
        assert text.inner_text() == f"Cancelled after {done} of {total} retrainings. Nothing is saved."
        assert cancel.is_hidden() and form.locator("button[type=submit]").is_enabled()
        assert page.locator("table.brittle-table tbody tr").count() == rows
    finally:
        cancel_quietly(rtab, job)
    rtab.assert_clean()


def test_mislabel_check_shows_its_scores_and_cancels(rtab: Tab) -> None:
    # the real check of this run takes well under a second, too fast to click: the job's answers
    # are played by the page's routes (the check's own steps and cancel: tests/engine, tests/app)
    page = rtab.page
    job = {"id": "fake-mislabel", "kind": "mislabel_check", "status": "running", "seconds": 1.0,
           "progress": {"done": 1, "total": 3}, "error": None, "error_kind": None,
           "url": "/api/v1/jobs/fake-mislabel", "params": {}, "result": None}
    cancelled = {"value": False}

    def post(route: Any) -> None:
        route.fulfill(status=202, json={**job, "progress": {"done": 0, "total": 3}})

    def follow(route: Any) -> None:
        if route.request.method == "DELETE":
            cancelled["value"] = True
            route.fulfill(json=job)
        elif cancelled["value"]:
            route.fulfill(json={**job, "status": "error", "error_kind": "cancelled", "error": "cancelled"})
        else:
            route.fulfill(json=job)

    page.route(rtab.base + "/api/v1/mislabels/check", post)
    page.route(rtab.base + "/api/v1/jobs/fake-mislabel", follow)
    rtab.goto("/")
    cancel = page.locator("#mislabel .job-status button.job-cancel")
    text = page.locator("#mislabel .job-status .job-text")
    assert cancel.is_hidden()
    page.locator("#mislabel form button[type=submit]").click()
    text.filter(has_text="Scoring: 1 of 3 done").wait_for()
    assert cancel.is_visible()
    cancel.click()
    text.filter(has_text="Cancelled after").wait_for()
    assert text.inner_text() == ("Cancelled after 1 of 3 scores. It stops after the score being computed; "
                                 "nothing is saved.")
    assert cancelled["value"] and cancel.is_hidden()
    rtab.assert_clean()
