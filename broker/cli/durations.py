"""The CLI's one duration syntax: `90s`, `10m`, `1h`, `1h30m`, `1d`, or plain seconds (`600`)."""

from __future__ import annotations

import re

import typer

# ASCII digits only: `\d` would also take Arabic-Indic or fullwidth digits.
_DURATION = re.compile(r"(?:([0-9]{1,6})d)?(?:([0-9]{1,6})h)?(?:([0-9]{1,7})m)?(?:([0-9]{1,9})s?)?")
_UNITS = (86400, 3600, 60, 1)
MAX_SECONDS = 366 * 86400  # far beyond any tier's max_ttl; refuses typos like 10000000h


def parse_duration(text: str) -> int:
    """Seconds for `text`; typer.BadParameter (a usage error, exit 2) for anything else."""
    found = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if found is None or not any(found.groups()):
        raise typer.BadParameter(f"{text!r} is not a duration: use 90s, 10m, 1h, 1h30m or seconds")
    seconds = sum(int(n) * unit for n, unit in zip(found.groups(), _UNITS, strict=True) if n)
    if not 1 <= seconds <= MAX_SECONDS:
        raise typer.BadParameter(f"{text!r}: a duration is between 1s and {MAX_SECONDS // 86400}d")
    return seconds
