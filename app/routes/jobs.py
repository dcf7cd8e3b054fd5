"""Background jobs: ``GET /api/v1/jobs/{id}`` and the routes that start them (``POST /api/v1/attacks``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from engine.attack import attack

from ..deps import DashDep
from ..images import png_data_url
from ..security import WriterDep
from ..services import Dashboard, check_index

router = APIRouter(prefix="/api/v1", tags=["jobs"])


def _jobs(request: Request) -> Any:
    return request.app.state.jobs


@router.get("/jobs/{job_id}")
def get_job(job_id: str, request: Request) -> dict[str, Any]:
    """A background job's status (queued, running, done, error), progress and result."""
    return _jobs(request).get(job_id).to_dict()


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
def start_attack(body: AttackRequest, request: Request, dash: DashDep) -> dict[str, Any]:
    """Start a training-set attack on one test prediction (Koh & Liang §5.2); poll the job."""
    check_index(body.test_id, dash.run.n_test, "test")
    params = body.model_dump()

    def work(report: Any) -> dict[str, Any]:
        out = attack(dash.run, body.test_id, n_points=body.n_points, epsilon=body.epsilon,
                     iterations=body.iterations, on_step=report)
        return _attack_view(dash, out)

    return _jobs(request).submit("attack", params, work).to_dict()
