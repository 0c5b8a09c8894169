"""`broker-cli login | logout | whoami`: a person's sign-in, by the device authorization grant.

`login` runs RFC 8628 against the broker's OpenID provider through authlib's OAuth2 client:
it shows a URL and a code, the person approves in any browser (this machine needs none),
and the tokens land in a file created 0600 from its first byte. Later commands send the
access token to that broker (and to no other: tokens are kept per broker URL), refreshing
it with the refresh token shortly before it expires; when that fails they say to log in again.

Where the tokens live: BROKER_TOKEN_FILE, else $XDG_CONFIG_HOME/jit-broker/tokens.json,
else ~/.config/jit-broker/tokens.json.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import requests
import typer

# authlib's requests integration: its httpx one now warns on import (it wants httpx2), and
# requests is already here (hvac's own HTTP client).
from authlib.integrations.requests_client import OAuth2Session, OAuthError

from broker.cli.target import broker_url

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Refresh this long before expiry: a request sent with a token that dies in flight fails.
REFRESH_MARGIN_SECONDS = 60
# A broker that answers 401 to a stored token, or a refresh that fails: sign in again.
EXIT_LOGIN_REQUIRED = 4
HTTP_TIMEOUT = 15.0


class LoginRequired(Exception):
    """The stored sign-in is missing, expired beyond refresh, or unreadable."""


# --- the token file ---------------------------------------------------------------------------


def token_file() -> Path:
    if os.environ.get("BROKER_TOKEN_FILE"):
        return Path(os.environ["BROKER_TOKEN_FILE"])
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "jit-broker" / "tokens.json"


def _read_store() -> dict[str, Any]:
    path = token_file()
    try:
        st = path.stat()
    except FileNotFoundError:
        return {"version": 1, "brokers": {}}
    # Someone else able to read (or own) the file could have read the tokens, or planted them.
    if stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != os.getuid():
        raise LoginRequired(f"{path} is readable by others or not yours; remove it (`broker-cli logout`) and log in again")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoginRequired(f"{path} is unreadable ({exc.__class__.__name__}); run `broker-cli logout`, then log in") from exc
    if not isinstance(data, dict) or not isinstance(data.get("brokers"), dict):
        raise LoginRequired(f"{path} is not a broker-cli token file; run `broker-cli logout`, then log in")
    return data


def _write_store(data: dict[str, Any]) -> None:
    """Atomically replace the file; the new one is 0600 before a byte of it is written."""
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _save_entry(broker: str, entry: dict[str, Any] | None, *, replace_unreadable: bool = False) -> None:
    try:
        data = _read_store()
    except LoginRequired:
        if not replace_unreadable:
            raise
        data = {"version": 1, "brokers": {}}  # a fresh login replaces a file that cannot be trusted
    if entry is None:
        data["brokers"].pop(broker, None)
    else:
        data["brokers"][broker] = entry
    _write_store(data)


# --- the IdP ----------------------------------------------------------------------------------


def _discover(issuer: str) -> dict[str, Any]:
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        response = httpx.get(url, timeout=HTTP_TIMEOUT)
        response.raise_for_status()
        doc: dict[str, Any] = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        typer.echo(f"error: cannot read the identity provider's discovery document at {url}: {exc}", err=True)
        raise typer.Exit(2) from exc
    if doc.get("issuer") != issuer:
        typer.echo(f"error: {url} names issuer {doc.get('issuer')!r}, not {issuer!r}", err=True)
        raise typer.Exit(2)
    if not doc.get("device_authorization_endpoint"):
        typer.echo(f"error: {issuer} does not offer the device authorization grant (RFC 8628); "
                   "enable it for the CLI's client at the identity provider", err=True)
        raise typer.Exit(2)
    return doc


def _oauth_client(client_id: str, client_secret: str | None = None) -> OAuth2Session:
    # A public client (RFC 8628 section 3.1): no secret on a person's laptop. Google's
    # limited-input clients are the exception: they have a "secret" that is not one.
    return OAuth2Session(client_id=client_id, client_secret=client_secret,
                         token_endpoint_auth_method="client_secret_post" if client_secret else "none",
                         default_timeout=HTTP_TIMEOUT)


def _token_entry(token: dict[str, Any]) -> dict[str, Any]:
    expires_at = token.get("expires_at") or (int(time.time()) + int(token.get("expires_in") or 300))
    kept = {k: token[k] for k in ("access_token", "id_token", "refresh_token", "token_type", "scope") if token.get(k)}
    return {**kept, "expires_at": int(expires_at)}


def bearer_of(token: dict[str, Any]) -> str:
    """The token the broker can verify: the access token when it is a JWT; else (Google, whose
    access tokens are opaque) the ID token, which the broker accepts when its audience is the
    CLI's client id."""
    access = str(token.get("access_token") or "")
    if access.count(".") == 2 or not token.get("id_token"):
        return access
    return str(token["id_token"])


def _fresh(token: dict[str, Any]) -> bool:
    return bool(token.get("access_token")) and token.get("expires_at", 0) - REFRESH_MARGIN_SECONDS > time.time()


@contextlib.contextmanager
def _refresh_lock() -> Iterator[None]:
    """One refresh at a time across this person's CLI processes: IdPs rotate refresh tokens for
    public clients, and a second process refreshing with the spent one would end the sign-in."""
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def current_token(broker: str) -> str | None:
    """The access token to send to `broker`, refreshed when near expiry; None if never signed in."""
    entry = _read_store()["brokers"].get(broker)
    if not entry:
        return None
    if _fresh(entry.get("token") or {}):
        return bearer_of(entry["token"])
    with _refresh_lock():
        entry = _read_store()["brokers"].get(broker)  # another process may have refreshed meanwhile
        if not entry:
            return None
        if _fresh(entry.get("token") or {}):
            return bearer_of(entry["token"])
        return _refresh(broker, entry)


def _refresh(broker: str, entry: dict[str, Any]) -> str:
    token = entry.get("token") or {}
    if not token.get("refresh_token"):
        raise LoginRequired("your sign-in has expired")
    try:
        with _oauth_client(entry["client_id"], entry.get("client_secret")) as client:
            kwargs = {"resource": entry["resource"]} if entry.get("resource") else {}
            fresh = client.refresh_token(entry["token_endpoint"], refresh_token=token["refresh_token"], **kwargs)
    except (OAuthError, requests.RequestException, KeyError, ValueError) as exc:
        raise LoginRequired(f"your sign-in has expired and could not be renewed ({exc.__class__.__name__})") from exc
    if not fresh.get("refresh_token"):  # the IdP kept the old one (no rotation)
        fresh["refresh_token"] = token["refresh_token"]
    entry["token"] = _token_entry(dict(fresh))
    _save_entry(broker, entry)
    return bearer_of(entry["token"])


def _broker_login_config(broker: str) -> dict[str, Any]:
    try:
        response = httpx.get(broker + "/v1/login", timeout=HTTP_TIMEOUT)
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach the broker at {broker}: {exc}", err=True)
        raise typer.Exit(2) from exc
    if response.status_code != 200:
        return {}
    config: dict[str, Any] = response.json()
    return config


def _whoami(broker: str, access_token: str) -> httpx.Response:
    return httpx.get(broker + "/v1/whoami", headers={"Authorization": f"Bearer {access_token}"}, timeout=HTTP_TIMEOUT)


def describe(me: dict[str, Any]) -> str:
    """One line saying who the broker sees (whoami, and after a sign-in)."""
    line = f"{me['name']} ({me['kind']})"
    if me.get("groups"):
        line += ", groups: " + ", ".join(me["groups"])
    if me.get("session_id"):
        line += f", session {me['session_id']}"
    return line


# --- commands ---------------------------------------------------------------------------------


def login(
    issuer: Annotated[str | None, typer.Option(help="OpenID provider; default: what the broker publishes at /v1/login")] = None,
    client_id: Annotated[str | None, typer.Option(help="the CLI's public client id at the provider")] = None,
    scope: Annotated[str | None, typer.Option(help="scopes to ask for")] = None,
    resource: Annotated[str | None, typer.Option(help="RFC 8707 resource indicator, for IdPs that need one")] = None,
    client_secret: Annotated[str | None, typer.Option(
        help="only for IdPs whose device-flow clients have one (Google); default BROKER_OIDC_CLI_CLIENT_SECRET")] = None,
) -> None:
    """Sign in as a person, by the device authorization grant: open the URL shown, enter the code."""
    broker = broker_url()
    published = _broker_login_config(broker)
    issuer = issuer or os.environ.get("BROKER_OIDC_ISSUER") or published.get("issuer")
    client_id = client_id or os.environ.get("BROKER_OIDC_CLI_CLIENT_ID") or published.get("client_id")
    scope = scope or os.environ.get("BROKER_OIDC_CLI_SCOPE") or published.get("scope") or "openid email offline_access"
    resource = resource or os.environ.get("BROKER_OIDC_CLI_RESOURCE") or published.get("resource")
    client_secret = client_secret or os.environ.get("BROKER_OIDC_CLI_CLIENT_SECRET") or None
    if not issuer or not client_id:
        typer.echo(f"error: the broker at {broker} names no identity provider for login "
                   "(its BROKER_OIDC_ISSUER / BROKER_OIDC_CLI_CLIENT_ID); pass --issuer and --client-id", err=True)
        raise typer.Exit(2)
    meta = _discover(issuer)
    request: dict[str, str] = {"client_id": client_id, "scope": scope}
    if resource:
        request["resource"] = resource
    with _oauth_client(client_id, client_secret) as client:
        try:
            answer = client.post(meta["device_authorization_endpoint"], data=request, withhold_token=True)
        except requests.RequestException as exc:
            typer.echo(f"error: cannot reach the identity provider: {exc}", err=True)
            raise typer.Exit(2) from exc
        grant = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
        if answer.status_code != 200 or "device_code" not in grant:
            typer.echo(f"error: the identity provider refused the device authorization request: "
                       f"{grant.get('error', answer.status_code)} {grant.get('error_description', '')}".rstrip(), err=True)
            raise typer.Exit(1)
        typer.echo(f"To sign in, open {grant['verification_uri']} and enter the code {grant['user_code']}")
        if grant.get("verification_uri_complete"):
            typer.echo(f"  (or open {grant['verification_uri_complete']})")
        typer.echo("Waiting for you to approve...")
        token = _poll(client, meta["token_endpoint"], grant)
    me = _whoami(broker, bearer_of(token))
    if me.status_code != 200:
        err = me.json().get("error", {}) if me.content else {}
        typer.echo(f"error: signed in at {issuer}, but the broker refuses the token: "
                   f"{err.get('code', me.status_code)}: {err.get('message', '')}", err=True)
        raise typer.Exit(1)
    entry = {"issuer": issuer, "client_id": client_id, "token_endpoint": meta["token_endpoint"],
             "revocation_endpoint": meta.get("revocation_endpoint"), "resource": resource, "token": _token_entry(token)}
    if client_secret:
        entry["client_secret"] = client_secret
    _save_entry(broker, entry, replace_unreadable=True)
    typer.echo(f"Signed in to {broker} as {describe(me.json())}")
    typer.echo(f"Tokens stored in {token_file()} (readable by you alone).")


def _poll(client: OAuth2Session, token_endpoint: str, grant: dict[str, Any]) -> dict[str, Any]:
    """RFC 8628 section 3.4-3.5: poll at the given interval, slower when told, until an answer."""
    interval = max(1, int(grant.get("interval") or 5))
    deadline = time.monotonic() + int(grant.get("expires_in") or 600)
    while time.monotonic() < deadline:
        time.sleep(interval)
        try:
            token = client.fetch_token(token_endpoint, grant_type=DEVICE_GRANT, device_code=grant["device_code"])
            return dict(token)
        except OAuthError as exc:
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":
                interval += 5
                continue
            reason = {"access_denied": "you declined the sign-in", "expired_token": "the code expired"}.get(
                exc.error or "", f"{exc.error}: {exc.description}")
            typer.echo(f"error: sign-in failed: {reason}; run `broker-cli login` again", err=True)
            raise typer.Exit(1) from exc
        except requests.RequestException as exc:
            typer.echo(f"error: cannot reach the identity provider: {exc}", err=True)
            raise typer.Exit(2) from exc
    typer.echo("error: sign-in failed: the code expired before it was approved; run `broker-cli login` again", err=True)
    raise typer.Exit(1)


def logout() -> None:
    """Forget the stored sign-in (every broker's): revoke the refresh tokens at the identity
    provider where it offers revocation (RFC 7009), then remove the token file."""
    path = token_file()
    try:
        entries = list(_read_store()["brokers"].values())
    except LoginRequired:
        entries = []  # unreadable or untrusted: nothing in it is sent anywhere, just remove it
    for entry in entries:
        _revoke(entry)
    with contextlib.suppress(FileNotFoundError):
        path.with_name(path.name + ".lock").unlink()
    try:
        path.unlink()
    except FileNotFoundError:
        typer.echo("not signed in")
        return
    typer.echo(f"signed out: removed {path}")


def _revoke(entry: dict[str, Any]) -> None:
    """Best effort: a revoked refresh token is worthless to whoever copied the file; a failure
    here must not keep the file (and the tokens) on disk."""
    token = (entry.get("token") or {}).get("refresh_token")
    endpoint = entry.get("revocation_endpoint")
    if not token or not endpoint:
        return
    try:
        with _oauth_client(entry["client_id"], entry.get("client_secret")) as client:
            response = client.revoke_token(endpoint, token=token, token_type_hint="refresh_token")  # noqa: S106  # RFC 7009's hint naming the token's kind
        if response.status_code != 200:
            typer.echo(f"warning: the identity provider did not revoke the refresh token (HTTP {response.status_code})",
                       err=True)
    except (OAuthError, requests.RequestException, KeyError) as exc:
        typer.echo(f"warning: could not revoke the refresh token at the identity provider ({exc.__class__.__name__})",
                   err=True)


def register(app: typer.Typer) -> None:
    app.command()(login)
    app.command()(logout)
