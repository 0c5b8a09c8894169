"""The CLI's HTTP client: BROKER_URL and a bearer token, errors shown as the broker said them.

Which token: `BROKER_TOKEN` if set; else, unless an identity is chosen explicitly with
`broker-cli --as human|admin` (or `BROKER_AS`), the person's sign-in from `broker-cli login` for
this broker (refreshed when near expiry); otherwise the embedded default's local files in
`BROKER_STATE_DIR` (default `.broker/`), `<identity>-token`, where the identity is the chosen
one, else the command's own preference (humans' commands prefer `human-token`), else `admin-token`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import typer

from broker.jsonbounds import loads_stored

IDENTITIES = ("human", "admin")


def broker_url() -> str:
    return os.environ.get("BROKER_URL", "http://127.0.0.1:8080").rstrip("/")


def state_dir() -> Path:
    return Path(os.environ.get("BROKER_STATE_DIR", ".broker"))


def token(prefer: str | None = None) -> str | None:
    if os.environ.get("BROKER_TOKEN"):
        return os.environ["BROKER_TOKEN"]
    explicit = os.environ.get("BROKER_AS")
    if not explicit:
        from broker.cli.login import EXIT_LOGIN_REQUIRED, LoginRequired, current_token

        try:
            signed_in = current_token(broker_url())
        except LoginRequired as exc:
            typer.echo(f"error: {exc}; run `broker-cli login`", err=True)
            raise typer.Exit(EXIT_LOGIN_REQUIRED) from exc
        if signed_in:
            return signed_in
    chosen = os.environ.get("BROKER_AS") or prefer
    # The embedded default's local tokens, for the person running `broker-cli dev` here.
    for identity in ([chosen] if os.environ.get("BROKER_AS") else [chosen, "admin"]):
        if identity:
            local = state_dir() / f"{identity}-token"
            if local.exists():
                return local.read_text().strip()
    return None


def request(method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
            identity: str | None = None, timeout: float = 30) -> httpx.Response:
    """One request; exits 2 (with the reason) if the broker cannot be reached."""
    headers = {}
    tok = token(identity)
    if tok:
        headers["Authorization"] = f"Bearer {tok}"
    try:
        return httpx.request(method, broker_url() + path, json=json, params=params, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach the broker at {broker_url()}: {exc}; is it running? (BROKER_URL)", err=True)
        raise typer.Exit(2) from exc


def call(method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
         ok: tuple[int, ...] = (200, 201, 202)) -> Any:
    response = request(method, path, json=json, params=params)
    if response.status_code not in ok:
        try:
            err = response.json().get("error", {})
            typer.echo(f"error: {err.get('code', response.status_code)}: {err.get('message', response.text)}", err=True)
        except ValueError:
            typer.echo(f"error: HTTP {response.status_code}: {response.text[:500]}", err=True)
        if response.status_code == 401:
            typer.echo("hint: sign in with `broker-cli login` (or set BROKER_TOKEN)", err=True)
        raise typer.Exit(1)
    # loads_stored: an audit record of any depth the broker once accepted must not break a reader.
    return loads_stored(response.content) if response.content else None
