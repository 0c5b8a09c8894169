"""Which broker the CLI talks to (`BROKER_URL`) and where local state lives (`BROKER_STATE_DIR`)."""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_NAME = ".broker"


def broker_url() -> str:
    return os.environ.get("BROKER_URL", "http://127.0.0.1:8080").rstrip("/")


def state_dir() -> Path:
    """`BROKER_STATE_DIR`, else the nearest `.broker/` in this directory or one above it (as git
    finds `.git/`), so the CLI works from any sub-directory of where `broker-cli dev` runs; else
    `.broker` here (which may not exist yet)."""
    if os.environ.get("BROKER_STATE_DIR"):
        return Path(os.environ["BROKER_STATE_DIR"])
    here = Path.cwd()
    for folder in (here, *here.parents):
        candidate = folder / STATE_DIR_NAME
        if candidate.is_dir():
            return candidate
    return Path(STATE_DIR_NAME)
