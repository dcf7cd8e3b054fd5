"""The app's wiring (app/main.py, deps.py, settings.py, limits.py, compression.py): compressed
responses, one way to reach dependencies, logging in uvicorn's format, settings from the
environment and limits defined once."""

from __future__ import annotations

import gzip
import logging
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app import limits, services
from app.deps import get_dashboard
from app.main import ROOT, create_app, logging_config
from app.settings import DemoSettings, Settings

APP = ROOT / "app"


# ------------------------------------------------------------------------------------------ gzip
def test_pages_json_and_scripts_are_sent_compressed(client: TestClient) -> None:
    home = client.get("/", headers={"Accept-Encoding": "gzip"})
    assert home.status_code == 200 and home.headers["content-encoding"] == "gzip"
    assert home.template.name == "overview.html"  # type: ignore[attr-defined]  # still testable
    assert "vary" in home.headers and "Accept-Encoding" in home.headers["vary"]
    scripts = re.findall(r'<script src="(/assets/plotly[^"]*\.js)"', home.text)
    assert scripts, "the overview loads the Plotly bundle"
    bundle = client.get(scripts[0], headers={"Accept-Encoding": "gzip"})
    assert bundle.status_code == 200 and bundle.headers["content-encoding"] == "gzip"
    assert int(bundle.num_bytes_downloaded) < len(bundle.content) / 2  # it went out compressed
    listing = client.get("/api/v1/test-points?limit=30", headers={"Accept-Encoding": "gzip"})
    assert listing.headers["content-encoding"] == "gzip" and listing.json()["total"] > 0


def test_raw_bytes_are_gzip_and_small_or_unasked_responses_are_not(client: TestClient) -> None:
    with client.stream("GET", "/", headers={"Accept-Encoding": "gzip"}) as r:
        raw = b"".join(r.iter_raw())
    assert gzip.decompress(raw).decode().lstrip().startswith("<!doctype html>")
    assert "content-encoding" not in client.get("/", headers={"Accept-Encoding": "identity"}).headers
    small = client.get("/api/v1/images/test/0.png", headers={"Accept-Encoding": "gzip"})
    assert small.status_code == 200 and len(small.content) < 1000
    assert "content-encoding" not in small.headers


# ------------------------------------------------------------------------------------------ deps
def test_routes_reach_shared_state_only_through_deps() -> None:
    for path in sorted((APP / "routes").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "app.state" not in text, f"{path} reads app.state (use app/deps.py)"
        assert "import os" not in text and "getenv" not in text, path


def test_a_dependency_override_reaches_the_pages_and_the_api(client: TestClient) -> None:
    dash = client.app.state.dashboard  # type: ignore[attr-defined]

    class Renamed:  # the served dashboard with other class names
        def __getattr__(self, name: str) -> object:
            return getattr(dash, name)

        @property
        def class_names(self) -> list[str]:
            return ["zero", "one", "two"]

    client.app.dependency_overrides[get_dashboard] = Renamed  # type: ignore[attr-defined]
    try:
        r = client.get("/test-points")
        assert r.context["class_names"] == ["zero", "one", "two"]  # type: ignore[attr-defined]
    finally:
        client.app.dependency_overrides.clear()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ logging
def test_logging_config_prints_app_and_engine_records_as_uvicorn_does() -> None:
    config = logging_config("debug")
    for name in ("app", "engine"):
        assert config["loggers"][name] == {"handlers": ["default"], "level": "DEBUG", "propagate": False}
    assert config["handlers"]["default"]["formatter"] == "default"
    assert "uvicorn.error" in config["loggers"]  # uvicorn's own loggers kept
    assert logging_config() is not logging_config()  # a fresh copy: uvicorn's default untouched


def test_every_app_module_logs_through_its_own_logger() -> None:
    for path in sorted(APP.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "basicConfig" not in text, path
        if "logging." in text:
            assert "logger = logging.getLogger(__name__)" in text, path


def test_no_blind_except_in_the_app() -> None:
    """The one ``except Exception`` (a job's) logs the traceback and reports an internal error."""
    for path in sorted(APP.rglob("*.py")):
        for m in re.finditer(r"except (Exception|BaseException)\b.*\n((?:.*\n){1,3})", path.read_text()):
            assert path.name == "jobs.py" and "logger.exception" in m.group(2), path
        assert not re.search(r"except\s*:", path.read_text()), path


def test_a_failing_job_in_the_served_app_logs_its_traceback(client: TestClient,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    jobs = client.app.state.jobs  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR, logger="app"):
        job = jobs.submit("broken", {}, lambda report: {}["missing"])
        while jobs.get(job.id).pending:
            time.sleep(0.01)
    assert jobs.get(job.id).to_dict()["error_kind"] == "internal"
    assert any(r.name == "app.jobs" and r.exc_info for r in caplog.records)


# ------------------------------------------------------------------------------------------ settings
def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {"RUN": str(tmp_path), "LOG_LEVEL": "debug", "JOB_WORKERS": "3",
                        "MAX_PENDING_JOBS": "5", "UPLOAD_LIMIT": "4096", "DEMO_RUN": "runs/x"}.items():
        monkeypatch.setenv(f"INFLUENCE_{name}", value)
    s = Settings()  # type: ignore[call-arg]
    assert (s.run, s.log_level, s.job_workers, s.max_pending_jobs, s.upload_limit) == (
        tmp_path, "debug", 3, 5, 4096)
    assert DemoSettings().demo_run == Path("runs/x")
    monkeypatch.setenv("INFLUENCE_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="log_level"):
        Settings()  # type: ignore[call-arg]


def test_the_job_settings_reach_the_job_manager(run_path: Path) -> None:
    with TestClient(create_app(Settings(run=run_path, job_workers=2, max_pending_jobs=3))) as c:
        jobs = c.app.state.jobs  # type: ignore[attr-defined]
        assert jobs.max_pending == 3 and jobs._pool._max_workers == 2


def test_no_environment_read_outside_settings() -> None:
    for path in sorted(APP.rglob("*.py")):
        if path.name == "settings.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert "os.environ" not in text and "getenv" not in text, path


# ------------------------------------------------------------------------------------------ limits
def test_limits_are_defined_once() -> None:
    # app/services.py checks the same bounds (until it imports them from app.limits)
    for name in ("DEFAULT_TOP", "MAX_TOP", "DEFAULT_LIMIT", "MAX_LIMIT"):
        assert getattr(services, name) == getattr(limits, name), name
    shared = limits.template_limits()
    assert shared["MAX_TOP"] == 500 and shared["AUDIT_MAX_TESTS"] == 1000
    for path in sorted((APP / "routes").rglob("*.py")) + [APP / "audits" / "schemas.py"]:
        text = path.read_text(encoding="utf-8")
        for literal in ("100_000", "1_000_000", "10_000", "le=500", "le=1000", "max_length=200)"):
            assert literal not in text, f"{path}: {literal} (use app/limits.py)"


def test_templates_see_the_limits(client: TestClient) -> None:
    env = client.app.state.templates.env  # type: ignore[attr-defined]
    assert env.globals["limits"]["MAX_TOP"] == limits.MAX_TOP
