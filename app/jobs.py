"""Long work off the request path: retraining checks and attacks run as background jobs that a
client polls (``GET /api/v1/jobs/{id}``) for progress and the result. One worker thread by
default (retraining is CPU-bound; queries keep answering meanwhile), a bounded queue, and the
last ``KEEP`` finished jobs remembered (in memory: a restart forgets them).

A job started with a ``key`` (its kind and parameters, e.g. a group page's retraining check) is
shared: submitting the same key again returns the job already queued, running or finished, so
reloading a permalink neither retrains twice nor loses the answer.

A job that fails says why in ``error``: an engine domain error (:class:`engine.InfluenceError`,
e.g. a model too large to retrain here) is the request's fault and keeps its message
(``error_kind: "bad_input"``); anything else is a bug, logged with its traceback and reported
as an internal error (``error_kind: "internal"``).

A job is cancelled (``DELETE /api/v1/jobs/{id}``, or every pending job when the server stops) at
its next progress report: ``report`` raises :class:`JobCancelled`, so long work that reports after
each retraining (LDS, brittleness, attacks) stops there (``error_kind: "cancelled"``). A queued
job never starts.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Any

from engine import InfluenceError

__all__ = ["KEEP", "ErrorKind", "Job", "JobCancelled", "JobManager", "JobNotFound", "JobStatus", "QueueFull",
           "Report"]

logger = logging.getLogger(__name__)

KEEP = 100
Report = Callable[[int, int], None]


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"


class ErrorKind(str, Enum):
    BAD_INPUT = "bad_input"  # an engine domain error: the request asked for something impossible
    INTERNAL = "internal"  # a bug or a failure of the server; the log has the traceback
    CANCELLED = "cancelled"  # stopped on request (or by the server's shutdown)


PENDING = (JobStatus.QUEUED, JobStatus.RUNNING)


class JobNotFound(LookupError):
    """No job has this id (or it was forgotten)."""


class QueueFull(RuntimeError):
    """Too many jobs are waiting; try again later."""


class JobCancelled(Exception):
    """Raised inside a job's work by its progress report once the job was cancelled."""


class Job:
    def __init__(self, kind: str, params: dict[str, Any], *, key: Hashable | None = None) -> None:
        self.id = secrets.token_urlsafe(12)
        self.kind = kind
        self.params = params
        self.key = key
        self.status = JobStatus.QUEUED
        self.done, self.total = 0, 0
        self.result: Any = None
        self.error: str | None = None
        self.error_kind: ErrorKind | None = None
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.cancel_requested = threading.Event()

    @property
    def pending(self) -> bool:
        return self.status in PENDING

    def fail(self, kind: ErrorKind, message: str) -> None:
        self.status, self.error_kind, self.error = JobStatus.ERROR, kind, message

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "params": self.params, "status": self.status.value,
                "progress": {"done": self.done, "total": self.total},
                "seconds": (self.finished or time.time()) - (self.started or self.created),
                "result": self.result, "error": self.error,
                "error_kind": self.error_kind.value if self.error_kind else None,
                "url": f"/api/v1/jobs/{self.id}"}


class JobManager:
    def __init__(self, *, workers: int = 1, max_pending: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="influence-job")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self.max_pending = max_pending

    def find(self, key: Hashable) -> Job | None:
        """The newest remembered job submitted with ``key`` (queued, running or finished)."""
        with self._lock:
            return next((j for j in reversed(self._jobs.values()) if j.key == key), None)

    def submit(self, kind: str, params: dict[str, Any], fn: Callable[[Report], Any], *,
               key: Hashable | None = None) -> Job:
        """Queue ``fn(report)``; ``report(done, total)`` updates the job's progress. With a ``key``,
        the job remembered under it, if any, is returned instead of starting another."""
        with self._lock:
            if key is not None:
                same = next((j for j in reversed(self._jobs.values()) if j.key == key), None)
                if same is not None and not same.cancel_requested.is_set():  # cancelled: start afresh
                    return same
            pending = sum(j.pending for j in self._jobs.values())
            if pending >= self.max_pending:
                raise QueueFull(f"{pending} jobs are already waiting or running; try again later")
            job = Job(kind, params, key=key)
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP + self.max_pending:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].pending:
                    break
                self._jobs.pop(oldest)

        def report(done: int, total: int) -> None:
            job.done, job.total = done, total
            if job.cancel_requested.is_set():
                raise JobCancelled(job.id)

        self._pool.submit(self._work, job, fn, report)
        logger.info("job %s (%s) queued", job.id, kind)
        return job

    @staticmethod
    def _work(job: Job, fn: Callable[[Report], Any], report: Report) -> None:
        job.status, job.started = JobStatus.RUNNING, time.time()
        try:
            if job.cancel_requested.is_set():
                raise JobCancelled(job.id)
            job.result = fn(report)
            job.status = JobStatus.DONE
        except JobCancelled:
            job.fail(ErrorKind.CANCELLED, "cancelled on request; its partial work is kept where the "
                                          "engine caches it (LDS resumes from its retrained subsets)")
            logger.info("job %s (%s) cancelled", job.id, job.kind)
        except InfluenceError as exc:  # the request's fault: its message is the answer
            job.fail(ErrorKind.BAD_INPUT, " ".join(str(exc).split()))
            logger.info("job %s (%s) refused: %s", job.id, job.kind, job.error)
        except Exception as exc:  # a bug: logged with its traceback, reported as internal
            logger.exception("job %s (%s) failed", job.id, job.kind)
            what = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            job.fail(ErrorKind.INTERNAL, f"internal error, not a problem with the request ({what}); "
                                         f"the server log has the traceback of job {job.id}")
        else:
            logger.info("job %s (%s) done in %.2f s", job.id, job.kind, time.time() - job.started)
        finally:
            job.finished = time.time()

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} (finished jobs are kept for the last {KEEP})")
        return job

    def cancel(self, job_id: str) -> Job:
        """Ask a queued or running job to stop (at its next progress report); a finished job is
        returned as it is."""
        job = self.get(job_id)
        if job.pending:
            job.cancel_requested.set()
        return job

    def shutdown(self) -> None:
        """Cancel every pending job (a running one stops at its next progress report)."""
        with self._lock:
            for job in self._jobs.values():
                if job.pending:
                    job.cancel_requested.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
