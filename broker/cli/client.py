"""The CLI's HTTP client: BROKER_URL and a bearer token, errors shown as the broker said them.

The token: BROKER_TOKEN if set, else the person's sign-in from `broker-cli login` for this
broker (refreshed when near expiry), else the embedded default's local admin token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import typer


def broker_url() -> str:
    return os.environ.get("BROKER_URL", "http://127.0.0.1:8080").rstrip("/")


def token() -> str | None:
    if os.environ.get("BROKER_TOKEN"):
        return os.environ["BROKER_TOKEN"]
    from broker.cli.login import EXIT_LOGIN_REQUIRED, LoginRequired, current_token

    try:
        signed_in = current_token(broker_url())
    except LoginRequired as exc:
        typer.echo(f"error: {exc}; run `broker-cli login`", err=True)
        raise typer.Exit(EXIT_LOGIN_REQUIRED) from exc
    if signed_in:
        return signed_in
    # The embedded default's admin token, for the person running `broker-cli dev` here.
    local = Path(os.environ.get("BROKER_STATE_DIR", ".broker")) / "admin-token"
    if local.exists():
        return local.read_text().strip()
    return None


def call(method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
         ok: tuple[int, ...] = (200, 201, 202)) -> Any:
    headers = {}
    tok = token()
    if tok:
        headers["Authorization"] = f"Bearer {tok}"
    try:
        response = httpx.request(method, broker_url() + path, json=json, params=params, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach the broker at {broker_url()}: {exc}", err=True)
        raise typer.Exit(2) from exc
    if response.status_code not in ok:
        try:
            err = response.json().get("error", {})
            typer.echo(f"error: {err.get('code', response.status_code)}: {err.get('message', response.text)}", err=True)
        except ValueError:
            typer.echo(f"error: HTTP {response.status_code}: {response.text[:500]}", err=True)
        if response.status_code == 401:
            typer.echo("hint: sign in with `broker-cli login` (or set BROKER_TOKEN)", err=True)
        raise typer.Exit(1)
    return response.json() if response.content else None
