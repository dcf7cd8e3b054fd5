"""The group page (app/routes/pages/groups.py): a group chosen by class, mislabel ranking,
cluster or ids, its predicted test-loss changes equal to the API's, and the retraining check as a
background job the page follows (never a retraining inside the request)."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from .conftest import N_TEST, N_TRAIN
from .pages_common import api, hrefs, page, post, served, wait_job


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with served(tmp_path_factory.mktemp("pages")) as c:
        yield c


@pytest.fixture(scope="module")
def projected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The same data with a projected run (K = 8): no parameter-space quantities."""
    with served(tmp_path_factory.mktemp("projected"), ihvp="projected", project=8) as c:
        yield c


def test_projected_run_pages_say_what_is_unavailable(projected: TestClient) -> None:
    assert projected.get("/api/v1/train-points/2/params").status_code == 422
    r = page(projected, "/train-points/2", "train_point.html")
    assert r.context["params"] is None and r.context["params_error"]
    assert "Not available for this run" in r.text.split('id="params"')[1]
    url = "/groups?by=class&label=0&fraction=0.5&check=1"
    job = wait_job(projected, page(projected, url, "groups.html").context["check_job"]["url"])
    assert job["error_kind"] == "bad_input" and "projected" in job["error"]  # order 2 is refused
    g = page(projected, url, "groups.html")
    assert list(g.context["results"]) == [1] and 2 in g.context["order_errors"]
    assert g.context["checked"] is None and g.context["check_error"] == job["error"]
    assert "Cannot check here" in g.text and 'id="plot-changes"' in g.text


# ---------------------------------------------------------------------------------------------
# groups


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


@contextmanager
def busy_worker(client: TestClient) -> Iterator[None]:
    """The app's one job worker kept busy meanwhile, so that jobs submitted in the block wait."""
    gate = threading.Event()
    jobs = client.app.state.jobs  # type: ignore[attr-defined]
    holder = jobs.submit("hold", {}, lambda report: gate.wait(60))
    try:
        yield
    finally:
        gate.set()
        wait_job(client, f"/api/v1/jobs/{holder.id}")


CHECK_URL = "/groups?by=class&label=0&fraction=0.3&test_ids=0,1,2,3,4,5&check=1"


def test_group_check_is_a_job_the_page_follows(client: TestClient) -> None:
    with busy_worker(client):  # the page answers while the retraining has not even started
        r = page(client, CHECK_URL, "groups.html")
        job = r.context["check_job"]
        assert job["kind"] == "group_check" and job["status"] == "queued" and r.context["checked"] is None
        assert job["params"] == {"group_size": len(r.context["members"]["train_ids"]), "n_tests": 6,
                                 "ihvp": None}
        assert f'id="check-job" data-job-id="{job["id"]}"' in r.text and 'id="plot-check"' not in r.text
        assert '<script src="/static/group_check.js" defer>' in r.text  # the poller (static/lib/jobs.js)
        # reloading finds the same job: one retraining however often the page is opened
        assert page(client, CHECK_URL, "groups.html").context["check_job"]["id"] == job["id"]
    done = wait_job(client, job["url"])
    assert done["status"] == "done" and done["progress"] == {"done": 1, "total": 1}, done["error"]
    r = page(client, CHECK_URL, "groups.html")
    ctx = r.context
    assert ctx["check_job"]["id"] == job["id"] and ctx["checked"] == done["result"]
    assert 'id="check-job"' not in r.text and 'id="check-link"' not in r.text
    # the answer is the synchronous one the page used to compute inside the request
    members = api(client, "/api/v1/groups?by=class&label=0&fraction=0.3")
    direct = client.app.state.dashboard.group_check(members["train_ids"], [0, 1, 2, 3, 4, 5])  # type: ignore[attr-defined]
    assert {k: v for k, v in ctx["checked"].items() if k != "seconds"} == \
        {k: v for k, v in direct.items() if k != "seconds"}
    first, second, diagonal = ctx["figures"]["check"]["data"]
    assert first["x"] == second["x"] == [row["actual"] for row in direct["results"]]
    assert first["y"] == [row["first_order"] for row in direct["results"]]
    assert second["y"] == [row["second_order"] for row in direct["results"]]
    assert diagonal["x"] == diagonal["y"]
    for key in ("first_order", "second_order"):
        assert f'{direct["mean_abs_error"][key]:.3g}' in r.text
    assert f'{direct["mean_abs_actual"]:.3g}' in r.text
    # the page's check link reproduces this check, and the API finds the same job
    plain = page(client, CHECK_URL.removesuffix("&check=1"), "groups.html")
    assert plain.context["check_job"] is None and 'id="check-link"' in plain.text
    linked = page(client, plain.context["check_url"], "groups.html").context
    assert linked["check_job"]["id"] == job["id"] and linked["checked"] == done["result"]
    again = post(client, "/api/v1/group-influence/check",
                 {"train_ids": members["train_ids"], "test_ids": [0, 1, 2, 3, 4, 5]}, status=202)
    assert again["id"] == job["id"] and again["result"] == done["result"]


def test_group_check_job_failure_is_an_internal_error(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    dash = client.app.state.dashboard  # type: ignore[attr-defined]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the retraining")

    monkeypatch.setattr(dash, "group_check", broken)
    url = "/groups?by=class&label=1&fraction=0.2&test_ids=3,4&check=1"
    with caplog.at_level(logging.INFO, logger="app.jobs"):
        job = wait_job(client, page(client, url, "groups.html").context["check_job"]["url"])
    assert job["status"] == "error" and job["error_kind"] == "internal", job
    assert job["error"].startswith("internal error, not a problem with the request (RuntimeError: a bug")
    (record,) = [r for r in caplog.records if r.name == "app.jobs" and r.levelno == logging.ERROR]
    assert job["id"] in record.getMessage() and record.exc_info is not None
    assert record.exc_info[0] is RuntimeError
    assert "Traceback (most recent call last)" in caplog.text and "in broken" in caplog.text
    r = page(client, url, "groups.html")
    assert r.context["check_error"] == job["error"] and "Cannot check here: internal error" in r.text


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

