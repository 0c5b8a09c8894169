"""The CLI's HTTP client: BROKER_URL and a bearer token, errors shown as the broker said them.

Which token: `BROKER_TOKEN` if set; else, unless an identity is chosen explicitly with
`broker-cli --as human|admin` (or `BROKER_AS`), the person's sign-in from `broker-cli login` for
this broker (refreshed when near expiry); otherwise the embedded default's local files in
`BROKER_STATE_DIR` (default `.broker/`), `<identity>-token`, where the identity is the chosen
one, else the command's own preference (humans' commands prefer `human-token`), else `admin-token`.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import typer

from broker.cli import retry
from broker.cli.exits import EXIT_USAGE, exit_for_status, fail
from broker.cli.target import broker_url, state_dir
from broker.jsonbounds import loads_stored

IDENTITIES = ("human", "admin")


def token_source(prefer: str | None = None) -> str:
    """Where `token(prefer)` takes the token from, in words (for `whoami` and hints)."""
    if os.environ.get("BROKER_TOKEN"):
        return "BROKER_TOKEN"
    if not os.environ.get("BROKER_AS"):
        from broker.cli.login import LoginRequired, current_token

        try:
            if current_token(broker_url()):
                return "your sign-in (`broker-cli login`)"
        except LoginRequired:
            return "your sign-in, which has expired (`broker-cli login`)"
    chosen = os.environ.get("BROKER_AS") or prefer
    for identity in ([chosen] if os.environ.get("BROKER_AS") else [chosen, "admin"]):
        if identity and (state_dir() / f"{identity}-token").exists():
            return str(state_dir() / f"{identity}-token")
    return f"nowhere (no BROKER_TOKEN, no sign-in, no token in {state_dir()})"


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
    """One request, an outage's 503 retried (broker/cli/retry.py); exits 2 (with the reason) if the
    broker cannot be reached."""
    headers = {}
    tok = token(identity)
    if tok:
        headers["Authorization"] = f"Bearer {tok}"
    try:
        return retry.send(lambda: httpx.request(method, broker_url() + path, json=json, params=params,
                                                headers=headers, timeout=timeout),
                          base_url=broker_url(), refused=False, say=lambda line: typer.echo(f"broker-cli: {line}", err=True))
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        fail(f"cannot reach the broker at {broker_url()}: {exc}", EXIT_USAGE,
             "is it running? (`broker-cli dev`, or set BROKER_URL to where it runs)")


def call(method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
         ok: tuple[int, ...] = (200, 201, 202)) -> Any:
    """One request whose answer must be one of `ok`; anything else is one line on stderr and the
    exit code of broker/cli/exits.py (401 -> 4, 404 -> 3, 400/422 -> 2, other refusals -> 1)."""
    response = request(method, path, json=json, params=params)
    if response.status_code not in ok:
        try:
            err = response.json().get("error", {})
        except (ValueError, AttributeError):
            err = {}
        code = err.get("code") or f"http-{response.status_code}"
        message = err.get("message") or response.text[:500] or response.reason_phrase
        problems = [p for p in err.get("problems") or [] if isinstance(p, dict)]
        if problems:  # which field, and why: `session_id: String should match pattern ...`
            first = problems[0]
            where = ".".join(str(x) for x in (first.get("loc") or [])[1:]) or "request"
            message += f" ({where}: {first.get('message')}" + (f"; {len(problems) - 1} more" if len(problems) > 1 else "") + ")"
        hint = None
        if response.status_code == 401:
            hint = ("sign in with `broker-cli login`, set BROKER_TOKEN, or on `broker-cli dev` run from where "
                    f"its state directory is (looked for {state_dir()}; BROKER_STATE_DIR says where)")
        fail(f"{code}: {message}", exit_for_status(response.status_code), hint)
    # loads_stored: an audit record of any depth the broker once accepted must not break a reader.
    return loads_stored(response.content) if response.content else None
