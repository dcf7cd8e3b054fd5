"""The group page: choose a group of training points, see the predicted change of the test
losses when it is removed (orders 1 and 2), and check both against retraining.

The retraining check (``check=1``) runs as a background job (:func:`app.routes.jobs.start_group_check`),
never inside the request: the page shows the job's progress and reloads when it is done; the
same URL then finds the finished job and shows its answer, so the link reproduces the check."""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from engine import InfluenceError, QueryError

from ... import security, viz
from ...deps import DashDep, JobsDep, SettingsDep
from ...errors import error_detail, error_status
from ...jobs import JobManager, JobStatus, QueueFull
from ...limits import AUDIT_MAX_TESTS, AUDIT_MAX_TRAIN, DEFAULT_CLUSTERS
from ...security import csp_nonce
from ...services import Dashboard
from ...views import change_summary
from ..jobs import check_ids, start_group_check
from ..params import (
    PageBool,
    PageClusters,
    PageFraction,
    PageGroupBy,
    PageGroupTop,
    PageIds,
    PageIhvp,
    PageInt,
    PageOrder,
)
from .base import page_router, render, url

__all__ = ["GROUP_THUMBS", "parse_ids", "router"]

router = page_router()

GROUP_THUMBS = 48  # training images shown on the group page
NEEDS_KEY = ("this server retrains only for requests that carry its API key: "
             "POST /api/v1/group-influence/check with 'Authorization: Bearer <key>'")


def parse_ids(text: str, what: str) -> list[int]:
    """Integers separated by commas or spaces (``"3, 8,21"``)."""
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise QueryError(f"{what} must be integers separated by commas, got {text!r}") from None


def _members(dash: Dashboard, by: str, *, label: int | None, fraction: float | None,
             top: int | None, clusters: int | None, cluster: int | None,
             ids: str | None) -> dict[str, Any]:
    if by != "ids":
        return dash.group_members(by=by, label=label, fraction=fraction or 1.0, top=top,
                                  clusters=clusters or DEFAULT_CLUSTERS, cluster=cluster)
    if not ids:
        raise QueryError("a group by ids needs ids, e.g. 3, 8, 21")
    chosen = list(dict.fromkeys(parse_ids(ids, "ids")))  # a repeated id counts once
    check_ids(chosen, dash.run.n_train, "train")
    return {"by": "ids", "train_ids": chosen, "size": len(chosen)}


def _check(ctx: dict[str, Any], jobs: JobManager, dash: Dashboard, *, train_ids: list[int],
           tests: list[int], ihvp: str | None, test_url: str) -> None:
    """Start (or find) the retraining check's job and put its state on the page: the answer and
    its figure when done, its error, or the job to poll."""
    try:
        job = start_group_check(jobs, dash, train_ids=train_ids, test_ids=tests, ihvp=ihvp)
    except QueueFull as exc:
        ctx["check_error"] = error_detail(exc)
        return
    ctx["check_job"] = {k: v for k, v in job.to_dict().items() if k != "result"}
    if job.status is JobStatus.DONE:
        ctx["checked"] = job.result
        ctx["figures"]["check"] = viz.group_check_scatter(job.result["results"], test_url=test_url)
    elif job.status is JobStatus.ERROR:
        ctx["check_error"] = job.error


@router.get("/groups", response_class=HTMLResponse)
def groups(request: Request, dash: DashDep, jobs: JobsDep, settings: SettingsDep,
           by: PageGroupBy = None, label: PageInt = None, fraction: PageFraction = None,
           top: PageGroupTop = None, clusters: PageClusters = None, cluster: PageInt = None,
           ids: PageIds = None, test_ids: PageIds = None, order: PageOrder = None,
           ihvp: PageIhvp = None, check: PageBool = None) -> Response:
    """Group influence: a group of training points (by class, the mislabel ranking, a k-means
    cluster or explicit ids), the predicted change of chosen test losses when it is removed
    (orders 1 and 2; ``order`` sorts the plot and goes into an audit item), and with ``check=1``
    both orders against actually retraining without it (a background job the page follows)."""
    order = order or 1
    form = {"by": by, "label": label, "fraction": fraction, "top": top, "clusters": clusters,
            "cluster": cluster, "ids": ids, "test_ids": test_ids, "order": order, "ihvp": ihvp}
    ctx: dict[str, Any] = {
        "form": form, "class_names": dash.class_names, "methods": dash.methods, "error": None,
        "members": None, "results": {}, "summaries": {}, "order_errors": {}, "figures": {},
        "checked": None, "check_error": None, "check_job": None, "check_url": None,
        "members_url": None, "audit": None, "thumbs": GROUP_THUMBS,
        "default_clusters": DEFAULT_CLUSTERS, "csp_nonce": csp_nonce(request)}
    if by is None:
        return render(request, "groups.html", ctx)
    try:
        members = _members(dash, by, label=label, fraction=fraction, top=top,
                           clusters=clusters, cluster=cluster, ids=ids)
        tests = (parse_ids(test_ids, "test_ids") if test_ids
                 else list(range(dash.health()["n_test"])))
        ctx["results"][order] = dash.group(members["train_ids"], tests, order=order, ihvp=ihvp)
    except InfluenceError as exc:
        ctx["error"] = error_detail(exc)
        return render(request, "groups.html", ctx, status_code=error_status(exc))
    other = 3 - order
    try:  # the other order beside it (order 2 is refused on projected runs: say why)
        ctx["results"][other] = dash.group(members["train_ids"], tests, order=other, ihvp=ihvp)
    except QueryError as exc:
        ctx["order_errors"][other] = error_detail(exc)
    ctx["results"] = dict(sorted(ctx["results"].items()))
    test_url = url("/test-points/{id}", ihvp=ihvp)  # formatted per point by the figures
    ctx.update(members=members,
               summaries={o: change_summary(r["results"]) for o, r in ctx["results"].items()},
               check_url=url("/groups", **form, check=1),
               members_url=None if by == "ids" else url(
                   "/api/v1/groups", by=by, label=label, fraction=fraction, top=top,
                   clusters=clusters, cluster=cluster),
               audit={"train_ids": members["train_ids"] if len(members["train_ids"]) <= AUDIT_MAX_TRAIN
                      else None, "test_ids": tests[:AUDIT_MAX_TESTS], "n_tests": len(tests)})
    ctx["figures"]["changes"] = viz.group_changes(
        {o: r["results"] for o, r in ctx["results"].items()}, sort_order=order, test_url=test_url)
    if check and security.api_key(settings):  # a page link cannot carry the key
        ctx["check_error"] = NEEDS_KEY
    elif check:
        _check(ctx, jobs, dash, train_ids=members["train_ids"], tests=tests, ihvp=ihvp,
               test_url=test_url)
    return render(request, "groups.html", ctx)
