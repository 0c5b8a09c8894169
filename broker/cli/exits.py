"""broker-cli's exit codes and its one way of saying what went wrong, for every verb.

    0  done
    1  the broker refused or failed (403 denied, 409 conflict, 429 budget, 5xx), or a check failed
       (`audit verify`, `policy check`)
    2  usage error (bad or missing arguments, 400/422 from the broker), or the broker cannot be reached
    3  not found (or not visible to you: ids are no oracle)
    4  not signed in (401): sign in, or choose an identity with --as / BROKER_TOKEN

The helpers keep the exit codes of the protocols they speak (`git-credential`, `exec`: 125 when
the wrapper failed, `hook pre-tool-use`: 2 blocks the tool call).
"""

from __future__ import annotations

from typing import NoReturn

import typer

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNAUTHENTICATED = 0, 1, 2, 3, 4


def exit_for_status(status: int) -> int:
    """The exit code for a broker answer of this HTTP status (>= 400)."""
    if status == 401:
        return EXIT_UNAUTHENTICATED
    if status == 404:
        return EXIT_NOT_FOUND
    if status in (400, 422):
        return EXIT_USAGE
    return EXIT_REFUSED


def fail(message: str, code: int = EXIT_USAGE, hint: str | None = None) -> NoReturn:
    """One clear line on stderr (and a `next:` hint), then exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"  next: {hint}", err=True)
    raise typer.Exit(code)
