"""The github provider's (and the github permission source's) settings: BROKER_GITHUB_*."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class GitHubSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="ignore", case_sensitive=False)

    github_api_url: str = "https://api.github.com"  # GitHub Enterprise: https://HOST/api/v3
    github_app_id: str | None = None
    github_private_key_file: Path | None = None
