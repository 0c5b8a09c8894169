"""The Dockerfile's structure. No container engine runs here, so the image itself is never built
in this suite (README, "Deploying"); what can be checked without one is checked: the stages, the
final stage's user, contents and entrypoint, and that everything it copies is in the build context."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|cc|clang|make|build-essential|rustc|cargo|python3?-dev|libpq-dev|apt-get|apk)\b")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Instructions with continuation lines joined; comments dropped; ARGs before FROM resolved."""
    logical, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse(DOCKERFILE.read_text())[1]


def test_multi_stage_on_a_slim_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert build.name == "build"
    for stage in stages:
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", stage.base), stage.base
    assert any("pip wheel" in run for run in build.all("RUN")), "wheels are built in the first stage"
    assert f"--from={build.name} /opt/venv /opt/venv" in final.all("COPY")


def test_final_stage_runs_as_a_non_root_user(stages: list[Stage]) -> None:
    final = stages[-1]
    users = final.all("USER")
    assert users, "the final stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and int(user) >= 1000
    # the user exists in the image with that uid
    assert any(f"--uid {user}" in run for run in final.all("RUN"))
    # nothing after USER switches back or runs as root
    last_user = max(i for i, (kw, _) in enumerate(final.instructions) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in final.instructions[last_user:])


def test_final_stage_has_no_build_tools(stages: list[Stage]) -> None:
    final = stages[-1]
    for run in final.all("RUN"):
        assert not BUILD_TOOLS.search(run), f"build tool in the final stage: {run}"
        assert "pip install" not in run and "pip wheel" not in run
    # only the built venv comes from the build stage: no wheels, no sources, no compilers
    assert list(final.all("COPY")) == ["--from=build /opt/venv /opt/venv"]


def test_entrypoint_healthcheck_and_environment(stages: list[Stage]) -> None:
    final = stages[-1]
    (entrypoint,) = final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["broker-cli", "serve"]
    (healthcheck,) = final.all("HEALTHCHECK")
    assert "/healthz" in healthcheck and healthcheck.split("CMD", 1)[1].strip().startswith("[")
    env = " ".join(final.all("ENV"))
    assert "BROKER_HOST=0.0.0.0" in env  # the default (loopback) would be unreachable from outside the container
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # the root filesystem is read-only under the chart
    assert final.all("EXPOSE") == ["8080"]


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics as far as this file uses them: last matching pattern wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/")) for p in prefixes):
            ignored = not negate
    return ignored


def test_everything_copied_is_in_the_build_context(stages: list[Stage]) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = []
    for stage in stages:
        for copy in stage.all("COPY"):
            words = shlex.split(copy)
            if any(w.startswith("--from=") for w in words):
                continue
            copied += [w for w in words[:-1] if not w.startswith("--")]
    assert {"pyproject.toml", "README.md", "broker", "migrations"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
    # what must never reach an image: local state, keys, the venv, git
    for private in (".broker/broker.db", ".venv/bin/python", ".git/config", "broker-config/broker.env", ".env",
                    "broker/__pycache__/app.cpython-311.pyc", "tests/conftest.py"):
        assert _ignored(private, patterns), private
