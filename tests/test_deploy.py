"""The team-server files: docker-compose.yml is accepted by Debian's docker-compose, and the
Dockerfile copies only what exists and checks the health route the app serves."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("profile", [None, "postgres"])
def test_compose_file_is_valid(profile: str | None) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's package)")
    args = [exe, "-f", str(ROOT / "docker-compose.yml")]
    if profile:
        args += ["--profile", profile]
    out = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "healthcheck" in out.stdout and "/api/v1/health" in out.stdout
    assert "postgres:15" in out.stdout and re.search(r"profiles:\s*\n\s*- postgres", out.stdout)


def test_dockerfile_copies_existing_paths_and_checks_health() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.MULTILINE):
        for path in src.split():
            assert (ROOT / path).exists(), path
    assert "HEALTHCHECK" in text and "/api/v1/health" in text
    assert "torch==2.13.0" in text  # the CPU wheel, not a CUDA build pulled by torch>=2.4


def test_every_compose_variable_is_a_setting_the_app_reads_with_its_default() -> None:
    """docker-compose passes INFLUENCE_* variables: each names a Settings field, and its
    fallback is the field's own default (a stale name or default would be silently ignored)."""
    from app.settings import ENV_PREFIX, Settings

    text = (ROOT / "docker-compose.yml").read_text()
    found = re.findall(r"^\s+(INFLUENCE_\w+): \$\{\1:-([^}]*)\}", text, flags=re.MULTILINE)
    fields = Settings.model_fields
    assert len(found) >= 10
    for var, fallback in found:
        name = var.removeprefix(ENV_PREFIX).lower()
        assert name in fields, var
        default = fields[name].get_default(call_default_factory=True)
        if name in {"log_level", "job_workers", "max_pending_jobs", "cache_mb", "torch_threads",
                    "upload_limit"}:
            assert str(default) == fallback, (var, default, fallback)
