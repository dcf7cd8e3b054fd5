"""Background jobs: ``GET /api/v1/jobs/{id}`` and the routes that start them: retraining checks
(``POST /api/v1/group-influence/check``, also started by the group page) and attacks
(``POST /api/v1/attacks``). Retraining runs only here, never inside a request."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, Field

from engine.attack import attack

from ..deps import DashDep, JobsDep, WriterDep
from ..images import png_data_url
from ..jobs import Job, JobManager
from ..limits import MAX_CHECK_TESTS, MAX_GROUP_TRAIN
from ..services import Dashboard, check_index

__all__ = ["AttackRequest", "GroupCheckRequest", "check_ids", "router", "start_group_check"]

router = APIRouter(prefix="/api/v1", tags=["jobs"])

GROUP_CHECK = "group_check"


@router.get("/jobs/{job_id}")
def get_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    """A background job's status (queued, running, done, error), progress and result."""
    return jobs.get(job_id).to_dict()


@router.delete("/jobs/{job_id}", dependencies=[WriterDep])
def cancel_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    """Cancel a queued or running job: it stops at its next progress report (an LDS after the
    subset it is retraining; its retrained subsets stay cached). A finished job is unchanged."""
    return jobs.cancel(job_id).to_dict()


# ------------------------------------------------------------------------------ retraining checks
class GroupCheckRequest(BaseModel):
    train_ids: list[int] = Field(min_length=1, max_length=MAX_GROUP_TRAIN, description="the group")
    test_ids: list[int] = Field(min_length=1, max_length=MAX_CHECK_TESTS, description="test points")
    ihvp: str | None = Field(default=None, description="IHVP method (default: the run's own)")


def check_ids(ids: Sequence[int], n: int, what: str) -> None:
    """Every id in ``0..n-1`` (:class:`engine.IndexOutOfRange` naming the first that is not)."""
    bad = next((i for i in ids if not 0 <= i < n), None)  # JSON ids may pass any int64
    if bad is not None:
        check_index(bad, n, what)


def _digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def start_group_check(jobs: JobManager, dash: Dashboard, *, train_ids: Sequence[int],
                      test_ids: Sequence[int], ihvp: str | None) -> Job:
    """The retraining check of a group as a job (:meth:`Dashboard.group_check`); the same group,
    test points and method share one job, so a page reload or a repeated request waits for it
    (or reads its result) instead of retraining again."""
    check_ids(train_ids, dash.run.n_train, "train")
    check_ids(test_ids, dash.run.n_test, "test")
    train, tests = list(train_ids), list(test_ids)
    key = (GROUP_CHECK, _digest(train), _digest(tests), ihvp)
    params = {"group_size": len(set(train)), "n_tests": len(tests), "ihvp": ihvp}

    def work(report: Any) -> dict[str, Any]:
        report(0, 1)
        out = dash.group_check(train, tests, ihvp=ihvp)
        report(1, 1)
        return out

    return jobs.submit(GROUP_CHECK, params, work, key=key)


@router.post("/group-influence/check", status_code=202, dependencies=[WriterDep])
def group_check(body: GroupCheckRequest, dash: DashDep, jobs: JobsDep) -> dict[str, Any]:
    """Start (or find) the check of first and second order against actually retraining without
    the group (small models only; seconds for a convex model on digits); poll the job."""
    return start_group_check(jobs, dash, train_ids=body.train_ids, test_ids=body.test_ids,
                             ihvp=body.ihvp).to_dict()


# ------------------------------------------------------------------------------ attacks
class AttackRequest(BaseModel):
    test_id: int
    n_points: int = Field(default=60, ge=1, le=200, description="training images to perturb")
    epsilon: float = Field(default=0.5, gt=0.0, le=10.0, description="bound on |δ| per input value")
    iterations: int = Field(default=10, ge=1, le=50, description="retrainings at most")


def _attack_view(dash: Dashboard, out: dict[str, Any]) -> dict[str, Any]:
    """The engine's answer with arrays turned into images: original, δ (grey = 0), perturbed."""
    eps = out["epsilon"]
    images = [{"train_id": i, "original": png_data_url(o), "perturbed": png_data_url(p),
               "delta": png_data_url(np.clip(0.5 + (p - o) / (2 * eps), 0.0, 1.0))}
              for i, o, p in zip(out["train_ids"], out["original"], out["perturbed"])]
    view = {k: v for k, v in out.items() if k not in ("original", "perturbed")}
    view["images"] = images
    view["test_image"] = png_data_url(dash.run.dataset.x_test[out["test_id"]])
    return view


@router.post("/attacks", status_code=202, dependencies=[WriterDep])
def start_attack(body: AttackRequest, dash: DashDep, jobs: JobsDep) -> dict[str, Any]:
    """Start a training-set attack on one test prediction (Koh & Liang §5.2); poll the job."""
    check_index(body.test_id, dash.run.n_test, "test")
    params = body.model_dump()

    def work(report: Any) -> dict[str, Any]:
        out = attack(dash.run, body.test_id, n_points=body.n_points, epsilon=body.epsilon,
                     iterations=body.iterations, on_step=report)
        return _attack_view(dash, out)

    return jobs.submit("attack", params, work).to_dict()
