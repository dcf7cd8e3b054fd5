"""The web layer's one configuration class (environment variables prefixed ``INFLUENCE_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_UPLOAD_LIMIT", "Settings"]

DEFAULT_UPLOAD_LIMIT = 5 * 1024 * 1024  # bytes


class Settings(BaseSettings):
    """Settings of the dashboard server.

    ``run`` is required (there is no safe default run); every field can be set from the
    environment: ``INFLUENCE_RUN``, ``INFLUENCE_HOST``, ``INFLUENCE_PORT``,
    ``INFLUENCE_DATABASE_URL``, ``INFLUENCE_UPLOAD_LIMIT``.
    """

    model_config = SettingsConfigDict(env_prefix="INFLUENCE_", frozen=True)

    run: Path = Field(description="run folder built by `influence build`")
    host: str = Field(default="127.0.0.1", description="interface to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the audit database (default: a SQLite file "
                                  "audits.sqlite3 beside the run folder)")
    upload_limit: int = Field(default=DEFAULT_UPLOAD_LIMIT, ge=1024,
                              description="largest accepted upload, in bytes")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.run.resolve().parent / 'audits.sqlite3').as_posix()}"
