"""Running Alembic from the broker: `broker-cli migrate` and the test fixtures use this."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str, engine: Engine | None = None) -> Config:
    if not (MIGRATIONS / "env.py").exists():
        raise RuntimeError(f"migrations not found at {MIGRATIONS}; run from a source checkout or the image")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["database_url"] = database_url
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def upgrade(database_url: str, engine: Engine | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url, engine), revision)
