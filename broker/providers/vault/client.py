"""The OpenBao/Vault client: the broker's own identity there (token or AppRole, renewed), one call at a time.

Shared by the vault provider and the openbao permission source (`PluginContext.shared`): one
login, one renewal schedule, one connection pool. Every call goes through `call`, which logs in
or renews first, retries once after a 403 when the broker's own token died and AppRole can
replace it, and translates hvac's errors into the broker's (`ProviderRejected`: the request was
refused, nothing created; `ProviderUnavailable`: worth retrying), secrets scrubbed.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions as hx
import requests
from requests.adapters import HTTPAdapter

from broker.errors import ProviderMisconfigured, ProviderRejected, ProviderUnavailable
from broker.plugins import PluginHealth
from broker.providers.vault.settings import VaultSettings

log = logging.getLogger("broker.providers.vault")
T = TypeVar("T")

# Connections kept open to OpenBao: as many as the request path's worker threads may use at once.
HTTP_POOL_SIZE = 64

# The backend said no: the request itself is wrong or not allowed. Nothing was created.
_REJECTED = (hx.InvalidRequest, hx.Unauthorized, hx.Forbidden, hx.InvalidPath, hx.UnsupportedOperation,
             hx.PreconditionFailed, hx.ParamValidationError)
# The backend could not answer: down, sealed, overloaded, or unreachable. Worth retrying.
_UNAVAILABLE = (hx.VaultDown, hx.InternalServerError, hx.BadGateway, hx.VaultNotInitialized,
                hx.RateLimitExceeded, hx.UnexpectedError, requests.RequestException)
# A 4xx that is no refusal: the request was cut off (the server sealing or shutting down cancels
# what is in flight, e.g. "failed to persist accessor index entry: context canceled"). Worth retrying.
_INTERRUPTED = ("context canceled", "context deadline exceeded", "vault is sealed", "shutting down")
# Service (s.), batch (b.), recovery (r.) and legacy hvs./hvb. tokens, wherever they hide.
_MULTI_ERROR = re.compile(r"\d+ errors? occurred:")
_TOKEN_SHAPE = re.compile(r"\b(?:hv)?[sbr]\.[A-Za-z0-9_-]{16,}")


class OpenBaoClient:
    """The broker's own session with OpenBao/Vault."""

    def __init__(self, *, addr: str, token: str | None = None, role_id: str | None = None,
                 secret_id: str | None = None, approle_mount: str = "approle", namespace: str | None = None,
                 timeout: float = 10.0) -> None:
        if not addr:
            raise ProviderMisconfigured("vault: set BROKER_VAULT_ADDR")
        if not token and not (role_id and secret_id):
            raise ProviderMisconfigured(
                "vault: set BROKER_VAULT_TOKEN, or BROKER_VAULT_ROLE_ID and BROKER_VAULT_SECRET_ID for AppRole")
        self.addr = addr.rstrip("/")
        self.namespace = namespace
        self._static_token = token
        self._role_id, self._secret_id, self._approle_mount = role_id, secret_id, approle_mount
        # Explicit: every call bounded by the timeout, TLS verified (requests' default, stated).
        self.hvac = hvac.Client(url=self.addr, namespace=namespace, timeout=timeout, verify=True)
        # Kept-alive connections for every worker thread (requests' default pool keeps 10 and
        # opens, then drops, one per call beyond them).
        for scheme in ("http://", "https://"):
            self.hvac.adapter.session.mount(scheme, HTTPAdapter(pool_connections=1, pool_maxsize=HTTP_POOL_SIZE))
        self._auth_lock = threading.Lock()
        self._authenticated = False
        self._renew_at: float | None = None  # monotonic; None = never (root or unrenewable)
        self._full_ttl = 0
        host = urlsplit(self.addr).hostname or ""
        if self.addr.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("vault: %s is plain HTTP to a non-loopback host; tokens cross the wire in clear", self.addr)

    @classmethod
    def from_settings(cls, s: VaultSettings, timeout: float) -> OpenBaoClient:
        return cls(
            addr=s.vault_addr or "",
            token=s.vault_token.get_secret_value() if s.vault_token else None,
            role_id=s.vault_role_id,
            secret_id=s.vault_secret_id.get_secret_value() if s.vault_secret_id else None,
            approle_mount=s.vault_approle_mount,
            namespace=s.vault_namespace,
            timeout=timeout,
        )

    def close(self) -> None:
        self.hvac.adapter.close()

    def health(self) -> PluginHealth:
        try:
            status = self.hvac.sys.read_health_status(method="GET", standby_ok=True)
            if isinstance(status, requests.Response):  # hvac hands back non-200 answers (sealed: 503) raw
                try:
                    status = status.json()
                except ValueError:
                    return PluginHealth(False, f"sys/health answered HTTP {status.status_code}")
            if not status.get("initialized", False):
                return PluginHealth(False, "vault is not initialized")
            if status.get("sealed", True):
                return PluginHealth(False, "vault is sealed")
            me = self.call("lookup-self", lambda c: c.auth.token.lookup_self())["data"]
            ttl = int(me.get("ttl") or 0)
            return PluginHealth(True, f"vault {status.get('version', '?')}; broker token ttl "
                                        f"{'none' if ttl == 0 else f'{ttl}s'}")
        except Exception as exc:  # noqa: BLE001  # health never raises: it reports
            return PluginHealth(False, _scrub(str(getattr(exc, "message", None) or type(exc).__name__),
                                                self.known_secrets()))

    def read(self, path: str) -> dict[str, Any] | None:
        """GET <path> with the broker's own token (None where nothing is there)."""
        answer: dict[str, Any] | None = self.call(f"read {path}", lambda c: c.read(path))
        return answer

    def call(self, op: str, fn: Callable[[hvac.Client], T]) -> T:
        """Run one Vault call with a fresh-enough broker token; translate every error."""
        try:
            self._ensure_auth()
            used = self.hvac.token
            try:
                return fn(self.hvac)
            except (hx.Forbidden, hx.Unauthorized):
                if not self._relogin_if_token_dead(used):
                    raise
                return fn(self.hvac)  # a 403 created nothing, so one retry is safe
        except (ProviderRejected, ProviderUnavailable, ProviderMisconfigured):
            raise
        except Exception as exc:  # noqa: BLE001  # any SDK error becomes the broker's error (fail closed)
            raise self._translate(op, exc) from None  # the cause may carry response bodies

    def _ensure_auth(self) -> None:
        with self._auth_lock:
            try:
                if not self._authenticated:
                    self._login()
                elif self._renew_at is not None and time.monotonic() >= self._renew_at:
                    self._renew()
            except (hx.Forbidden, hx.Unauthorized, hx.InvalidRequest) as exc:
                detail = _scrub(_vault_errors(exc), self.known_secrets())[:200]
                raise ProviderRejected(f"vault login: the broker's own credentials were refused ({detail})") from None

    def _login(self) -> None:
        if self._role_id and self._secret_id:
            auth = self.hvac.auth.approle.login(self._role_id, self._secret_id, use_token=True,
                                                   mount_point=self._approle_mount)["auth"]
            self._schedule(int(auth.get("lease_duration") or 0), int(auth.get("lease_duration") or 0),
                           bool(auth.get("renewable")))
        else:
            self.hvac.token = self._static_token
            me = self.hvac.auth.token.lookup_self()["data"]
            self._schedule(int(me.get("ttl") or 0), int(me.get("creation_ttl") or me.get("ttl") or 0),
                           bool(me.get("renewable")))
        self._authenticated = True

    def _schedule(self, ttl: int, full_ttl: int, renewable: bool) -> None:
        """Renew (or log in again) once less than a third of the token's TTL remains."""
        if ttl <= 0:
            self._renew_at = None  # root or periodic-less token without expiry
        elif not renewable and not self._role_id:
            self._renew_at = None  # nothing we can do; it expires, then calls fail as rejected
            log.warning("vault: the broker's token is not renewable and expires in %ss", ttl)
        else:
            self._renew_at = time.monotonic() + max(0.0, ttl - full_ttl / 3)
        self._full_ttl = full_ttl

    def _renew(self) -> None:
        try:
            auth = self.hvac.auth.token.renew_self()["auth"]
            ttl = int(auth.get("lease_duration") or 0)
            if ttl > self._full_ttl / 3:
                self._schedule(ttl, self._full_ttl, bool(auth.get("renewable")))
                return
            reason = f"renewal capped at {ttl}s (max TTL)"
        except hx.VaultError as exc:  # refused: not renewable, or already dead
            reason = f"renewal refused ({type(exc).__name__})"
        # Unreachable (requests errors) propagates: this call fails as unavailable, the next retries.
        if self._role_id and self._secret_id:
            log.info("vault: broker token %s; logging in again with AppRole", reason)
            self._login()
        else:
            log.warning("vault: broker token %s and no AppRole to fall back to", reason)
            self._renew_at = None

    def _relogin_if_token_dead(self, used: str | None) -> bool:
        """After a 403: if our own token is dead and AppRole can replace it, do so."""
        if not (self._role_id and self._secret_id):
            return False
        with self._auth_lock:
            if self.hvac.token != used:
                return True  # another thread logged in again meanwhile
            try:
                self.hvac.auth.token.lookup_self()
                return False  # our token is fine: the 403 is a real refusal
            except (hx.Forbidden, hx.Unauthorized):
                self._login()
                return True

    def known_secrets(self) -> list[str]:
        return [s for s in (self._static_token, self._secret_id, self.hvac.token) if s]

    def _translate(self, op: str, exc: Exception) -> Exception:
        if isinstance(exc, requests.RequestException):
            return ProviderUnavailable(f"vault {op}: cannot reach {self.addr} ({type(exc).__name__})")
        if isinstance(exc, hx.VaultError):
            detail = _scrub(_vault_errors(exc), self.known_secrets())[:300] or type(exc).__name__
            interrupted = any(marker in detail.lower() for marker in _INTERRUPTED)
            cls = ProviderRejected if isinstance(exc, _REJECTED) and not interrupted else ProviderUnavailable
            return cls(f"vault {op}: {detail}")
        if isinstance(exc, _UNAVAILABLE):
            return ProviderUnavailable(f"vault {op}: {type(exc).__name__}")
        return ProviderUnavailable(f"vault {op}: unexpected {type(exc).__name__}")


def _vault_errors(exc: hx.VaultError) -> str:
    """OpenBao's error list as one line: "1 error occurred:\\n\\t* permission denied" -> "permission denied"."""
    errors = exc.errors or ([exc.args[0]] if exc.args and exc.args[0] else [])
    parts = (p.strip(" \t*") for e in errors for p in _MULTI_ERROR.sub("", str(e)).split("\n"))
    return "; ".join(p for p in parts if p)


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        text = text.replace(s, "[redacted]")
    return _TOKEN_SHAPE.sub("[redacted]", text)
