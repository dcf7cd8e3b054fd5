"""Domain errors of the engine.

Every error a user can cause derives from :class:`InfluenceError`; the CLI turns them into a
one-line message and exit code 2, the web layer into a 4xx JSON error.
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "IndexOutOfRange",
    "InfluenceError",
    "ModelError",
    "QueryError",
    "RunError",
    "SolverError",
    "StaleRunError",
]


class InfluenceError(Exception):
    """Base class for errors caused by the user's input, data, model or run."""


class DataError(InfluenceError):
    """The data set is missing, malformed or inconsistent."""


class ModelError(InfluenceError):
    """The model name, file or factory cannot be used."""


class RunError(InfluenceError):
    """A run folder is missing, incomplete or unreadable."""


class StaleRunError(RunError):
    """A run no longer matches its data or model (fingerprint mismatch)."""


class SolverError(InfluenceError):
    """An inverse-Hessian-vector product cannot be computed with the given settings."""


class QueryError(InfluenceError):
    """A query names an index or option that does not exist."""


class IndexOutOfRange(QueryError):
    """A query names a training or test index that the run does not have."""
