"""The browser's side of the console: a server-side session behind a random cookie id, the
CSRF synchronizer token bound to it, and the security headers of every console answer.

The cookie holds 32 random bytes and nothing else; the row (`browser_sessions`) is keyed by
their SHA-256. `HttpOnly`, `SameSite=Lax`, and `Secure` unless the broker's public URL is plain
http on loopback (then the `__Host-` prefix, which demands Secure, is dropped too). A sign-in
replaces the id (no fixation); sign-out deletes the row. Expired rows are deleted when new ones
are made.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlsplit

from sqlmodel import col, delete
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import Request

from broker.db import transaction, utcnow
from broker.identity.callers import Caller
from broker.identity.oidc import is_loopback
from broker.models import BrowserSession
from broker.runtime import Broker

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PREFIX = "/console"
# Long enough for a round trip through the IdP's login and consent pages, no longer.
ANONYMOUS_SECONDS = 900
# last_seen_at is written at most this often: a page view is not a database write.
TOUCH_SECONDS = 60

# No inline script, no inline style, nothing from elsewhere; never framed.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "x-content-type-options": "nosniff",
    "cross-origin-opener-policy": "same-origin",
}


def cookie_secure(broker: Broker) -> bool:
    url = broker.settings.public_base_url()
    return not (urlsplit(url).scheme == "http" and is_loopback(url))


def cookie_name(broker: Broker) -> str:
    return "__Host-jitb_console" if cookie_secure(broker) else "jitb_console"


def _digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass
class Browser:
    """The request's browser session. Routes change it; the middleware persists it once."""

    row: BrowserSession | None = None
    raw_id: str | None = None  # the cookie value, only while it must be (re)sent
    changed: bool = False
    ended: bool = False
    old_hash: str | None = None  # a replaced id (sign-in), deleted when the new one is stored
    session_data: dict[str, Any] = field(default_factory=dict)

    @property
    def signed_in(self) -> bool:
        return self.row is not None and self.row.principal is not None

    @property
    def csrf_token(self) -> str:
        return self.row.csrf_token if self.row else ""

    def caller(self) -> Caller | None:
        if not self.signed_in:
            return None
        assert self.row is not None and self.row.principal is not None  # noqa: S101  # narrowing: signed_in checked both
        return Caller(kind="human", name=self.row.principal, groups=frozenset(self.row.groups))

    def ensure(self, now: datetime) -> None:
        """An anonymous session: what a sign-in form's CSRF token and the OAuth state live in."""
        if self.row is None:
            self._new(now, principal=None, groups=[], via=None, seconds=ANONYMOUS_SECONDS)

    def sign_in(self, broker: Broker, principal: str, groups: list[str], via: str, now: datetime) -> None:
        """A new id and a new CSRF token: whatever id the browser had before stays anonymous."""
        if self.row is not None:
            self.old_hash = self.row.id_hash
        self.row = None
        self.session_data.clear()  # the same dict authlib sees as request.session
        self._new(now, principal=principal, groups=groups, via=via,
                  seconds=broker.settings.console_session_ttl_seconds)

    def sign_out(self) -> None:
        if self.row is not None:
            self.old_hash = self.row.id_hash
        self.row, self.ended, self.changed = None, True, True

    def flash(self, kind: str, text: str) -> None:
        self.session_data.setdefault("_flash", []).append({"kind": kind, "text": text})

    def take_flashes(self) -> list[dict[str, str]]:
        return list(self.session_data.pop("_flash", []))

    def _new(self, now: datetime, *, principal: str | None, groups: list[str], via: str | None, seconds: int) -> None:
        self.raw_id = secrets.token_urlsafe(32)
        self.row = BrowserSession(id_hash=_digest(self.raw_id), principal=principal, groups=sorted(groups), via=via,
                                  csrf_token=secrets.token_urlsafe(32), data={}, created_at=now, last_seen_at=now,
                                  expires_at=now + timedelta(seconds=seconds))
        self.changed = True


def check_csrf(browser: Browser, submitted: str | None) -> bool:
    """The synchronizer token: the form's hidden field must equal this session's token."""
    expected = browser.csrf_token
    return bool(expected) and bool(submitted) and hmac.compare_digest(expected.encode(), (submitted or "").encode())


def browser_of(request: Request) -> Browser:
    browser: Browser = request.scope["console_browser"]
    return browser


# --- the store ------------------------------------------------------------------------------

def _load(broker: Broker, raw_id: str | None, now: datetime) -> BrowserSession | None:
    if not raw_id or len(raw_id) > 128:
        return None
    with transaction(broker.engine) as db:
        row = db.get(BrowserSession, _digest(raw_id))
        if row is None:
            return None
        idle = timedelta(seconds=broker.settings.console_idle_seconds)
        if row.expires_at <= now or (row.principal is not None and row.last_seen_at + idle <= now):
            db.delete(row)
            return None
        if (now - row.last_seen_at).total_seconds() >= TOUCH_SECONDS:
            row.last_seen_at = now
            db.add(row)
        db.expunge(row)
        return row


def _store(broker: Broker, browser: Browser, now: datetime) -> None:
    with transaction(broker.engine) as db:
        if browser.old_hash is not None:
            db.exec(delete(BrowserSession).where(col(BrowserSession.id_hash) == browser.old_hash))
        if browser.row is not None:
            if browser.raw_id is not None:  # a new row: a good moment to drop expired ones
                db.exec(delete(BrowserSession).where(col(BrowserSession.expires_at) <= now))
            browser.row.data = dict(browser.session_data)
            db.merge(browser.row)


# --- the middleware -------------------------------------------------------------------------

def _cookie(scope: Scope, name: str) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # noqa: BLE001  # fail closed: a malformed Cookie header of any kind is no session
                return None
            if name in jar:
                return jar[name].value
    return None


class ConsoleMiddleware:
    """Loads the browser session for /console requests, stores it after the route ran, sets the
    cookie, and adds the security headers to every console answer (static files included)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        broker: Broker = scope["app"].state.broker
        static = path.startswith(PREFIX + "/static/")
        browser = Browser()
        if not static:
            now = utcnow()
            row = await run_in_threadpool(_load, broker, _cookie(scope, cookie_name(broker)), now)
            if row is not None:
                browser.row = row
                browser.session_data = dict(row.data or {})
        before = copy.deepcopy(browser.session_data)
        scope["console_browser"] = browser
        scope["session"] = browser.session_data  # authlib keeps its OAuth state (PKCE verifier, nonce) here

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if not static:
                    headers["cache-control"] = "no-store"
                    data_changed = browser.row is not None and browser.session_data != before
                    if browser.changed or data_changed:
                        await run_in_threadpool(_store, broker, browser, utcnow())
                    if browser.raw_id is not None and browser.row is not None:
                        headers.append("set-cookie", self._set_cookie(broker, browser.raw_id,
                                                                      broker.settings.console_session_ttl_seconds))
                    elif browser.ended:
                        headers.append("set-cookie", self._set_cookie(broker, "", 0))
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    def _set_cookie(broker: Broker, value: str, max_age: int) -> str:
        parts = [f"{cookie_name(broker)}={value}", "Path=/", f"Max-Age={max_age}", "HttpOnly", "SameSite=Lax"]
        if cookie_secure(broker):
            parts.append("Secure")
        return "; ".join(parts)
