"""Background jobs: an attack started through the API runs off the request path, reports
progress, and its result (confirmed by retraining) comes back with images."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from app.jobs import JobManager, QueueFull

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


def test_job_manager_reports_errors_and_bounds_its_queue() -> None:
    jobs = JobManager(workers=1, max_pending=2)
    gate = []

    def slow(report):  # noqa: ANN001, ANN202 - a job body
        while not gate:
            time.sleep(0.01)
        report(1, 1)
        return {"ok": True}

    first = jobs.submit("slow", {}, slow)
    jobs.submit("slow", {}, slow)
    with pytest.raises(QueueFull):
        jobs.submit("slow", {}, slow)
    gate.append(1)
    while jobs.get(first.id).status != "done":
        time.sleep(0.01)
    failing = jobs.submit("boom", {}, lambda report: 1 / 0)
    while jobs.get(failing.id).status not in ("done", "error"):
        time.sleep(0.01)
    assert jobs.get(failing.id).to_dict()["error"].startswith("ZeroDivisionError")
    assert jobs.get(first.id).to_dict()["result"] == {"ok": True}
    jobs.shutdown()
