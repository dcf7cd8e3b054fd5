"""The web layer's configuration (environment variables prefixed ``INFLUENCE_``): every variable
the app reads goes through a pydantic-settings class here, never ``os.environ``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.cache import DEFAULT_BUDGET_BYTES

from .limits import DEFAULT_UPLOAD_LIMIT

__all__ = ["DEFAULT_DEMO_RUN", "DEFAULT_UPLOAD_LIMIT", "ENV_PREFIX", "MIN_API_KEY", "DemoSettings",
           "LogLevel", "Settings"]

ENV_PREFIX = "INFLUENCE_"
MIN_API_KEY = 16  # characters
DEFAULT_DEMO_RUN = Path("runs/demo")
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """Settings of the dashboard server.

    ``run`` is required (there is no safe default run); every field can be set from the
    environment: ``INFLUENCE_RUN``, ``INFLUENCE_HOST``, ``INFLUENCE_PORT``,
    ``INFLUENCE_DATABASE_URL``, ``INFLUENCE_UPLOAD_LIMIT``, ``INFLUENCE_TORCH_THREADS``,
    ``INFLUENCE_API_KEY``, ``INFLUENCE_CORS_ORIGINS`` (comma-separated),
    ``INFLUENCE_LOG_LEVEL``, ``INFLUENCE_JOB_WORKERS``, ``INFLUENCE_MAX_PENDING_JOBS``,
    ``INFLUENCE_CACHE_MB``.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True)

    run: Path = Field(description="run folder built by `influence build`")
    host: str = Field(default="127.0.0.1", description="interface to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the audit database (default: a SQLite file "
                                  "audits.sqlite3 beside the run folder)")
    upload_limit: int = Field(default=DEFAULT_UPLOAD_LIMIT, ge=1024,
                              description="largest accepted upload, in bytes")
    torch_threads: int = Field(
        default=1, ge=1, le=512, description="PyTorch CPU threads per query when serving: queries "
        "already run on many request threads, so one each avoids oversubscribing the cores")
    api_key: SecretStr | None = Field(
        default=None, description="a key that may edit every audit and list them (Bearer token); "
        "when set, creating audits and starting retraining jobs need it too")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins (scheme://host[:port]) whose pages may call the "
        "API from a browser; none by default, '*' for any (never with credentials)")

    log_level: LogLevel = Field(default="info", description="level of the app's and the engine's "
                                "log records (uvicorn's format when served)")
    job_workers: int = Field(default=1, ge=1, le=64, description="threads that run background jobs "
                             "(retraining checks, attacks): retraining is CPU-bound")
    max_pending_jobs: int = Field(default=8, ge=1, le=1000, description="background jobs queued or "
                                  "running at once; more are refused with 429")
    cache_mb: int = Field(default=DEFAULT_BUDGET_BYTES >> 20, ge=0, le=1 << 20,
                          description="budget of the run's query caches in MiB (engine.cache): "
                          "everything that grows with request parameters shares it")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.run.resolve().parent / 'audits.sqlite3').as_posix()}"

    @field_validator("api_key", "database_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # compose files pass unset variables as ""

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin == "*":
                continue
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
                    or parts.query or parts.fragment:
                raise ValueError(f"a CORS origin is scheme://host[:port], not {origin!r}")
        return [o.rstrip("/") for o in origins]

    @field_validator("api_key")
    @classmethod
    def _long_enough(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and len(key.get_secret_value()) < MIN_API_KEY:
            raise ValueError(f"the API key must be at least {MIN_API_KEY} characters")
        return key


class DemoSettings(BaseSettings):
    """What ``influence demo`` reads from the environment: ``INFLUENCE_DEMO_RUN``, the run folder
    it builds when missing and then serves."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    demo_run: Path = Field(default=DEFAULT_DEMO_RUN, description="run folder of `influence demo`")
