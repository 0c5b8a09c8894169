"""Which broker the CLI talks to (`BROKER_URL`) and where local state lives (`BROKER_STATE_DIR`)."""

from __future__ import annotations

import os
from pathlib import Path


def broker_url() -> str:
    return os.environ.get("BROKER_URL", "http://127.0.0.1:8080").rstrip("/")


def state_dir() -> Path:
    return Path(os.environ.get("BROKER_STATE_DIR", ".broker"))
