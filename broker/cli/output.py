"""What every broker-cli command prints: JSON for scripts (`--json`), or text lines with the
agent-written fields made visible (no hidden or terminal-control characters reach the screen).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from broker.display import visible
from broker.jsonbounds import dumps_stored

JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def out(data: Any, as_json: bool, human: str | None = None, *, shown: bool = False) -> None:
    """`shown`: `human` was built from fields already passed through `visible` (so a line break
    inside a field is a mark, not a new line); otherwise each line is made visible here."""
    if as_json or human is None:
        # ASCII JSON (json's default, said here on purpose): hidden characters leave as \uXXXX.
        typer.echo(dumps_stored(data, indent=None if as_json else 2, default=str, ensure_ascii=True))
    elif shown:
        typer.echo(human)
    else:
        # Text lines carry agent-written fields: each line's invisible, direction-changing and
        # control characters (terminal escapes) are shown as ⟦U+XXXX⟧ (broker.display).
        typer.echo("\n".join(visible(line) for line in human.split("\n")))


def shown(value: Any) -> str:
    return visible("" if value is None else str(value))
