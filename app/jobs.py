"""Long work off the request path: retraining checks and attacks run as background jobs that a
client polls (``GET /api/v1/jobs/{id}``) for progress and the result. One worker thread by
default (retraining is CPU-bound; queries keep answering meanwhile), a bounded queue, and the
last ``KEEP`` finished jobs remembered (in memory: a restart forgets them)."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine import InfluenceError

__all__ = ["Job", "JobManager", "JobNotFound", "QueueFull"]

KEEP = 100
Report = Callable[[int, int], None]


class JobNotFound(LookupError):
    """No job has this id (or it was forgotten)."""


class QueueFull(RuntimeError):
    """Too many jobs are waiting; try again later."""


class Job:
    def __init__(self, kind: str, params: dict[str, Any]) -> None:
        self.id = secrets.token_urlsafe(12)
        self.kind = kind
        self.params = params
        self.status = "queued"
        self.done, self.total = 0, 0
        self.result: Any = None
        self.error: str | None = None
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "params": self.params, "status": self.status,
                "progress": {"done": self.done, "total": self.total},
                "seconds": (self.finished or time.time()) - (self.started or self.created),
                "result": self.result, "error": self.error, "url": f"/api/v1/jobs/{self.id}"}


class JobManager:
    def __init__(self, *, workers: int = 1, max_pending: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="influence-job")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self.max_pending = max_pending

    def submit(self, kind: str, params: dict[str, Any], fn: Callable[[Report], Any]) -> Job:
        """Queue ``fn(report)``; ``report(done, total)`` updates the job's progress."""
        with self._lock:
            pending = sum(j.status in ("queued", "running") for j in self._jobs.values())
            if pending >= self.max_pending:
                raise QueueFull(f"{pending} jobs are already waiting or running; try again later")
            job = Job(kind, params)
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP + self.max_pending:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].status in ("queued", "running"):
                    break
                self._jobs.pop(oldest)

        def report(done: int, total: int) -> None:
            job.done, job.total = done, total

        def work() -> None:
            job.status, job.started = "running", time.time()
            try:
                job.result = fn(report)
                job.status = "done"
            except InfluenceError as exc:
                job.status, job.error = "error", " ".join(str(exc).split())
            except Exception as exc:  # a job must never die silently: its error is its result
                job.status, job.error = "error", f"{type(exc).__name__}: {exc}"
            finally:
                job.finished = time.time()

        self._pool.submit(work)
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} (finished jobs are kept for the last {KEEP})")
        return job

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
