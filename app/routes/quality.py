"""The run's reliability checks: the linear datamodeling score (LDS), mislabel detection against
recorded label flips, and brittleness (how few helpful training points flip a prediction).

Each check retrains models, so it runs as a background job (``POST`` answers 202 with the job;
poll ``GET /api/v1/jobs/{id}`` for its progress and result). Results are saved in the run folder
(``lds.json``, ``mislabel.json``, ``brittleness.json``), read back by the ``GET`` routes and shown
in the overview's reliability panel. The same settings share one job: a repeated request returns
the job already queued, running or done instead of retraining again (a failed one is retried).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body
from pydantic import BaseModel, ConfigDict, Field

from engine import QueryError
from engine.brittle import brittleness
from engine.lds import lds, subset_masks
from engine.mislabel import mislabel_check
from engine.solvers import parse_method

from ..deps import DashDep, JobsDep, WriterDep
from ..jobs import Job, JobManager, JobStatus, Report
from ..limits import DEFAULT_LDS_TESTS, MAX_BRITTLE_K, MAX_BRITTLE_TESTS, MAX_LDS_SUBSETS, MAX_LDS_TESTS
from ..services import Dashboard
from .jobs import check_ids

__all__ = ["BrittlenessRequest", "LdsRequest", "MislabelRequest", "router",
           "start_brittleness", "start_lds", "start_mislabel_check"]

router = APIRouter(prefix="/api/v1", tags=["reliability"])

LDS, MISLABEL, BRITTLENESS = "lds", "mislabel_check", "brittleness"
MAX_SEED = 2**32 - 1

Ihvp = Annotated[str | None, Field(description="IHVP method (default: the run's own)")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is refused, not ignored


class LdsRequest(_Request):
    subsets: int = Field(default=30, ge=2, le=MAX_LDS_SUBSETS, description="random subsets M (retrained models)")
    fraction: float = Field(default=0.5, gt=0.0, lt=1.0, description="share of the training set in each subset")
    tests: int | None = Field(default=None, ge=1, le=MAX_LDS_TESTS,
                              description=f"test points drawn with the seed (default {DEFAULT_LDS_TESTS}, "
                                          "or every one when the run has fewer)")
    test_ids: list[int] | None = Field(default=None, min_length=1, max_length=MAX_LDS_TESTS,
                                       description="these test points instead of a seeded draw")
    output: Literal["loss", "margin"] = Field(default="loss", description="the retrained model's output")
    ihvp: Ihvp = None
    damping: float | None = Field(default=None, ge=0.0, allow_inf_nan=False,
                                  description="damping δ of the scores (default: the run's)")
    retraining: Literal["scratch", "warm"] = Field(
        default="scratch", description="networks: from a fresh seeded init, or warm-started from θ̂")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="subsets, test draw and init seeds")


class MislabelRequest(_Request):
    ihvp: Ihvp = None


class BrittlenessRequest(_Request):
    test_ids: list[int] | None = Field(default=None, min_length=1, max_length=MAX_BRITTLE_TESTS,
                                       description="test points (default: `tests` drawn with the seed)")
    tests: int = Field(default=5, ge=1, le=MAX_BRITTLE_TESTS, description="test points to draw")
    max_k: int | None = Field(default=None, ge=1, le=MAX_BRITTLE_K,
                              description="largest number of top helpful points to remove (default: "
                                          "a tenth of the training set, at most 1,000)")
    ihvp: Ihvp = None
    seed: int = Field(default=0, ge=0, le=MAX_SEED)


def _check_ihvp(dash: Dashboard, ihvp: str | None) -> None:
    """An IHVP method this run offers (422 naming the ones it does, before a job is queued)."""
    method = parse_method(ihvp)
    if method is not None and method.value not in dash.methods:
        raise QueryError(f"ihvp {method.value!r} is not available on this run: use one of "
                         f"{', '.join(dash.methods)}")


def _submit(jobs: JobManager, kind: str, params: dict[str, Any], work: Callable[[Report], Any]) -> Job:
    """Queue ``work`` keyed by its kind and settings, so the same request shares one job; a
    failed job is not shared (the next request retries under a fresh key)."""
    key: Hashable = (kind, tuple(sorted((k, repr(v)) for k, v in params.items())))
    while (prev := jobs.find(key)) is not None and prev.status is JobStatus.ERROR:
        key = (key, prev.id)
    return jobs.submit(kind, params, work, key=key)


def start_lds(jobs: JobManager, dash: Dashboard, body: LdsRequest) -> Job:
    """The LDS of the run's scores (:func:`engine.lds.lds`) as a job; progress counts the
    retrained subsets (cached ones at once)."""
    run = dash.run
    _check_ihvp(dash, body.ihvp)
    subset_masks(run.n_train, subsets=2, fraction=body.fraction, seed=body.seed)  # a usable fraction
    if body.test_ids is not None:
        check_ids(body.test_ids, run.n_test, "test")
    elif body.tests is not None and body.tests > run.n_test:
        raise QueryError(f"tests must be between 1 and the {run.n_test} test points, got {body.tests}")
    tests = body.tests or min(DEFAULT_LDS_TESTS, run.n_test)
    params = {**body.model_dump(exclude={"tests"}), "tests": None if body.test_ids else tests}

    def work(report: Report) -> dict[str, Any]:
        return lds(run, subsets=body.subsets, fraction=body.fraction, tests=tests,
                   test_index=body.test_ids, output=body.output, ihvp=body.ihvp, damping=body.damping,
                   retraining=body.retraining, seed=body.seed, save=True, callback=report)

    return _submit(jobs, LDS, params, work)


def start_mislabel_check(jobs: JobManager, dash: Dashboard, body: MislabelRequest) -> Job:
    """AUC and recall of self-influence and its baselines against the recorded label flips."""
    run = dash.run
    _check_ihvp(dash, body.ihvp)
    if run.info.data.n_flipped == 0:
        raise QueryError("this run has no recorded label flips to find: build it with "
                         "--label-noise F (e.g. 0.1) to measure mislabel detection")

    def work(report: Report) -> dict[str, Any]:
        return mislabel_check(run, ihvp=body.ihvp, save=True, callback=report)

    return _submit(jobs, MISLABEL, body.model_dump(), work)


def start_brittleness(jobs: JobManager, dash: Dashboard, body: BrittlenessRequest) -> Job:
    """The smallest k of top helpful training points whose removal flips each prediction."""
    run = dash.run
    _check_ihvp(dash, body.ihvp)
    if body.test_ids is not None:
        check_ids(body.test_ids, run.n_test, "test")

    def work(report: Report) -> dict[str, Any]:
        return brittleness(run, test_index=body.test_ids, tests=body.tests, max_k=body.max_k,
                           ihvp=body.ihvp, seed=body.seed, save=True, callback=report)

    return _submit(jobs, BRITTLENESS, body.model_dump(), work)


@router.post("/lds", status_code=202, dependencies=[WriterDep])
def post_lds(body: LdsRequest, dash: DashDep, jobs: JobsDep) -> dict[str, Any]:
    """Start (or find) the linear datamodeling score of the run's scores as a job (retrains M
    models; saved in the run); poll the job for progress."""
    return start_lds(jobs, dash, body).to_dict()


@router.get("/lds")
def get_lds(dash: DashDep) -> dict[str, Any]:
    """The run's saved LDS results, one per (ihvp, damping, output, subsets, fraction, retraining)."""
    return {"results": dash.lds_results()}


@router.post("/mislabels/check", status_code=202, dependencies=[WriterDep])
def post_mislabel_check(dash: DashDep, jobs: JobsDep,
                        body: Annotated[MislabelRequest | None, Body()] = None) -> dict[str, Any]:
    """Start the mislabel check (AUC, recall@k% against the recorded label flips) as a job."""
    return start_mislabel_check(jobs, dash, body or MislabelRequest()).to_dict()


@router.post("/brittleness", status_code=202, dependencies=[WriterDep])
def post_brittleness(dash: DashDep, jobs: JobsDep,
                     body: Annotated[BrittlenessRequest | None, Body()] = None) -> dict[str, Any]:
    """Start the brittleness search (fewest top helpful points whose removal flips a prediction)."""
    return start_brittleness(jobs, dash, body or BrittlenessRequest()).to_dict()


@router.get("/reliability")
def reliability(dash: DashDep) -> dict[str, Any]:
    """Every saved check of the run: trust (leave-one-out), LDS, mislabel AUC and brittleness."""
    return dash.reliability()
