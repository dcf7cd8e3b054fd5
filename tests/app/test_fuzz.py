"""Property-based fuzz of every operation in the app's OpenAPI with schemathesis: requests that
follow the schema (positive) and requests that break it (negative), sent in-process to the ASGI
app. No request may be answered with a 5xx, and every 2xx must match its documented schema.

Derandomized (the same requests on every run) and without a Hypothesis example database, so CI
is reproducible and nothing is written into the repository. Audits go to a throwaway SQLite
file; the job queue holds one job, so an attack that starts runs alone and the next ones are 429.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import get_client, shutdown_lifespans
from schemathesis.specs.openapi.checks import response_schema_conformance

from app.jobs import JobManager
from app.main import create_app
from app.settings import Settings

API_KEY = "f" * 32
BEARER = {"Authorization": f"Bearer {API_KEY}"}
# (generation mode, with the API key and an existing audit's slug?, examples per operation)
PASSES = [(GenerationMode.POSITIVE, True, 70), (GenerationMode.NEGATIVE, True, 70),
          (GenerationMode.NEGATIVE, False, 30)]
MIN_OPERATIONS = 24
MIN_REQUESTS = 3000


@pytest.fixture(scope="module")
def fuzz_app(run_path: Path, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    db = tmp_path_factory.mktemp("fuzz") / "audits.sqlite3"
    return create_app(Settings(run=run_path, database_url=f"sqlite:///{db}", upload_limit=64 * 1024,
                               api_key=API_KEY))


def _fuzz(strategy: Any, examples: int, send: Callable[[schemathesis.Case], None]) -> None:
    """Send ``examples`` cases drawn from ``strategy``, seeded."""

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def draw(case: schemathesis.Case) -> None:
        send(case)

    draw()


class Tally:
    """Requests sent per operation, answers per status, and every failed check."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []

    def send(self, case: schemathesis.Case) -> None:
        label = case.operation.label
        self.sent[label] += 1
        try:
            response = case.call()
        except Exception as exc:  # noqa: BLE001 - the app raised: a server would answer 500
            self.statuses[500] += 1
            self.failures.append(f"{label}: {type(exc).__name__}: {exc}\n{case.as_curl_command()}")
            return
        self.statuses[response.status_code] += 1
        checks = [not_a_server_error]
        if 200 <= response.status_code < 300:
            checks.append(response_schema_conformance)
        try:
            case.validate_response(response, checks=checks)
        except Exception as exc:  # noqa: BLE001 - a failed check: kept, reported at the end
            self.failures.append(f"{label}: {response.status_code} {response.text[:300]}\n{exc}"[:2000])


@pytest.mark.slow
def test_fuzz_every_operation(fuzz_app: FastAPI) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)  # starts the app's lifespan
    fuzz_app.state.jobs.shutdown()
    fuzz_app.state.jobs = JobManager(max_pending=1)  # one attack at a time, the next ones are 429
    with get_client(fuzz_app) as client:
        created = client.post("/api/v1/audits", json={"title": "fuzz", "items": [
            {"kind": "mislabel", "train_id": 1}]}, headers=BEARER)
    assert created.status_code == 201, created.text
    slug = created.json()["slug"]
    operations = [result.ok() for result in schema.get_all_operations()]
    tally = Tally()
    start = time.perf_counter()
    try:
        for operation in operations:
            for mode, keyed, examples in PASSES:
                fixed: dict[str, Any] = {"headers": BEARER} if keyed else {}
                if keyed and "{slug}" in operation.path:
                    fixed["path_parameters"] = {"slug": slug}
                try:
                    _fuzz(operation.as_strategy(generation_mode=mode, **fixed), examples, tally.send)
                except Unsatisfiable:  # no invalid request exists (no parameters, or free strings)
                    assert mode is GenerationMode.NEGATIVE, operation.label
    finally:
        fuzz_app.state.jobs.shutdown()
        shutdown_lifespans()
    seconds = time.perf_counter() - start
    total = sum(tally.sent.values())
    print(f"\nfuzz: {len(operations)} operations, {total} requests in {seconds:.0f} s; "
          f"statuses {dict(sorted(tally.statuses.items()))}")
    assert len(operations) >= MIN_OPERATIONS
    assert set(tally.sent) == {op.label for op in operations}, "an operation was never called"
    assert total >= MIN_REQUESTS, tally.sent
    assert not [s for s in tally.statuses if s >= 500], "\n\n".join(tally.failures[:20])
    assert not tally.failures, "\n\n".join(tally.failures[:20])


def test_the_fuzz_reports_a_server_error() -> None:
    """The harness itself: a route that raises for some inputs is counted as a 5xx, with the
    request that did it, rather than passing unseen."""
    app = FastAPI()

    @app.get("/items/{n}")
    def item(n: int) -> dict[str, int]:
        if n > 5:
            raise RuntimeError("boom")
        return {"n": n}

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    tally = Tally()
    try:
        for result in schema.get_all_operations():
            _fuzz(result.ok().as_strategy(), 50, tally.send)
    finally:
        shutdown_lifespans()
    assert tally.statuses[200] > 0 and tally.statuses[500] > 0, tally.statuses
    assert any("RuntimeError: boom" in failure for failure in tally.failures)
