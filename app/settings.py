"""The web layer's one configuration class (environment variables prefixed ``INFLUENCE_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Settings of the dashboard server.

    ``run`` is required (there is no safe default run); ``INFLUENCE_RUN``, ``INFLUENCE_HOST`` and
    ``INFLUENCE_PORT`` set the fields from the environment.
    """

    model_config = SettingsConfigDict(env_prefix="INFLUENCE_", frozen=True)

    run: Path = Field(description="run folder built by `influence build`")
    host: str = Field(default="127.0.0.1", description="interface to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on")
