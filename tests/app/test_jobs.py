"""Background jobs: an attack started through the API runs off the request path, reports
progress, and its result (confirmed by retraining) comes back with images."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from fastapi.testclient import TestClient

from app.jobs import JobManager, QueueFull
from engine import QueryError

from .conftest import N_TEST


def _wait(client: TestClient, url: str, timeout: float = 120.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        job = client.get(url).json()
        if job["status"] in ("done", "error"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {url} did not finish in {timeout} s")


def test_attack_job(client: TestClient) -> None:
    r = client.post("/api/v1/attacks", json={"test_id": 3, "n_points": 12, "epsilon": 0.4, "iterations": 3})
    assert r.status_code == 202, r.text
    job = _wait(client, r.json()["url"])
    assert job["status"] == "done" and job["kind"] == "attack", job["error"]
    out = job["result"]
    assert 1 <= job["progress"]["done"] <= 3 and job["progress"]["total"] == 3
    assert out["test_id"] == 3 and len(out["train_ids"]) == len(out["images"]) == 12
    assert out["max_abs_delta"] <= 0.4 + 1e-12
    assert out["flipped"] == (out["predicted_after"] != out["label"])
    for img in out["images"]:
        assert all(img[k].startswith("data:image/png;base64,") for k in ("original", "delta", "perturbed"))


@pytest.mark.parametrize("body, status", [
    ({"test_id": N_TEST}, 404), ({"test_id": 0, "epsilon": 0}, 422), ({"test_id": 0, "n_points": 0}, 422),
    ({"test_id": 0, "iterations": 99}, 422), ({}, 422),
])
def test_attack_bad_requests(client: TestClient, body: dict, status: int) -> None:
    r = client.post("/api/v1/attacks", json=body)
    assert r.status_code == status and r.json()["detail"]


def test_unknown_job_is_404(client: TestClient) -> None:
    r = client.get("/api/v1/jobs/nope")
    assert r.status_code == 404 and "no job" in r.json()["detail"]


def _finish(jobs: JobManager, job_id: str) -> dict:
    while jobs.get(job_id).pending:
        time.sleep(0.01)
    return jobs.get(job_id).to_dict()


def test_job_manager_bounds_its_queue_and_shares_keyed_jobs() -> None:
    jobs = JobManager(workers=1, max_pending=2)
    gate = threading.Event()

    def slow(report):
        gate.wait(30)
        report(1, 1)
        return {"ok": True}

    first = jobs.submit("slow", {}, slow, key="k")
    assert jobs.submit("slow", {}, slow, key="k") is first  # the same key: the same job
    jobs.submit("slow", {}, slow)
    with pytest.raises(QueueFull):
        jobs.submit("slow", {}, slow)
    assert jobs.submit("slow", {}, slow, key="k") is first  # a shared job needs no queue room
    gate.set()
    done = _finish(jobs, first.id)
    assert done["status"] == "done" and done["result"] == {"ok": True} and done["error_kind"] is None
    assert done["progress"] == {"done": 1, "total": 1}
    assert jobs.submit("slow", {}, slow, key="k") is first and jobs.find("k") is first  # finished: kept
    jobs.shutdown()


def test_a_domain_error_is_bad_input_and_a_bug_an_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    jobs = JobManager()

    def refused(report):
        raise QueryError("top must be between 1 and 500,\n got 0")

    def buggy(report):
        return 1 / 0

    with caplog.at_level(logging.INFO, logger="app.jobs"):
        bad = _finish(jobs, jobs.submit("refused", {}, refused).id)
        bug = _finish(jobs, jobs.submit("buggy", {}, buggy).id)
    jobs.shutdown()
    # the engine's refusal is the answer, on one line, and no error is logged for it
    assert (bad["status"], bad["error_kind"], bad["error"]) == ("error", "bad_input",
                                                                "top must be between 1 and 500, got 0")
    # anything else is a bug: said to be internal, with its traceback in the log
    assert (bug["status"], bug["error_kind"]) == ("error", "internal")
    assert bug["error"].startswith("internal error, not a problem with the request "
                                   "(ZeroDivisionError: division by zero)") and bug["id"] in bug["error"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and bug["id"] in errors[0].getMessage()
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is ZeroDivisionError
    assert "Traceback (most recent call last)" in caplog.text and "return 1 / 0" in caplog.text


def test_group_check_job_failure_through_the_api(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args, **kwargs):
        raise KeyError("missing")

    monkeypatch.setattr(client.app.state.dashboard, "group_check", broken)  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR, logger="app.jobs"):
        r = client.post("/api/v1/group-influence/check", json={"train_ids": [1, 2, 7], "test_ids": [5]})
        assert r.status_code == 202, r.text
        job = _wait(client, r.json()["url"])
    assert job["error_kind"] == "internal" and "KeyError" in job["error"]
    assert any(rec.exc_info and rec.exc_info[0] is KeyError for rec in caplog.records)


def test_a_cancelled_job_stops_at_its_next_report_and_the_same_key_starts_afresh() -> None:
    jobs = JobManager(workers=1, max_pending=4)
    started, reports = threading.Event(), []

    def work(report) -> str:
        started.set()
        for i in range(1000):
            report(i, 1000)  # raises once cancelled
            reports.append(i)
            time.sleep(0.01)
        return "finished"

    running = jobs.submit("lds", {}, work, key=("lds", 1))
    queued = jobs.submit("lds", {}, lambda report: "never", key=("lds", 2))
    assert started.wait(10)
    jobs.cancel(queued.id)
    jobs.cancel(running.id)
    end = time.time() + 10
    while (running.pending or queued.pending) and time.time() < end:
        time.sleep(0.02)
    for job in (running, queued):
        d = job.to_dict()
        assert d["status"] == "error" and d["error_kind"] == "cancelled", d
    assert len(reports) < 1000 and queued.result is None  # stopped early; the queued one never ran
    again = jobs.submit("lds", {}, lambda report: "again", key=("lds", 1))
    assert again.id != running.id  # not the cancelled job
    end = time.time() + 10
    while again.pending and time.time() < end:
        time.sleep(0.02)
    assert again.result == "again"
    assert jobs.cancel(again.id).status.value == "done"  # a finished job stays as it is
    jobs.shutdown()


def test_shutdown_cancels_the_running_job() -> None:
    jobs = JobManager(workers=1, max_pending=2)
    started = threading.Event()

    def work(report) -> None:
        started.set()
        while True:
            report(0, 1)
            time.sleep(0.01)

    job = jobs.submit("brittleness", {}, work)
    assert started.wait(10)
    jobs.shutdown()
    end = time.time() + 10
    while job.pending and time.time() < end:
        time.sleep(0.02)
    assert job.to_dict()["error_kind"] == "cancelled"


def test_delete_job_route_cancels(client: TestClient) -> None:
    r = client.post("/api/v1/attacks", json={"test_id": 4, "n_points": 12, "epsilon": 0.4, "iterations": 50})
    assert r.status_code == 202, r.text
    d = client.delete(r.json()["url"])
    assert d.status_code == 200
    job = _wait(client, r.json()["url"])
    # cancelled at its next report, unless it finished first (50 retrainings: it does not)
    assert job["status"] == "error" and job["error_kind"] == "cancelled", job
    assert client.delete("/api/v1/jobs/nope").status_code == 404
