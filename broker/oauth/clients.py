"""Who an OAuth client is: pre-registered from config, or a Client ID Metadata Document.

A CIMD client's `client_id` is an https URL; the broker fetches the JSON document there and
takes it as the client's registration when its `client_id` equals the URL exactly
(draft-ietf-oauth-client-id-metadata-document). The fetch is the SSRF surface of the broker,
so it is fenced:

- https only, default port or any, no userinfo, no fragment, a path that is not "/" and has
  no dot segments, at most 2048 characters;
- the host is resolved once and every address must be public: loopback, private, link-local,
  multicast, reserved and unspecified addresses are refused (loopback, and plain http, only
  with the test-only `BROKER_CIMD_ALLOW_LOOPBACK`); the connection goes to the address that
  was checked (TLS still verifies the certificate for the host name), so DNS cannot swap the
  target between check and use;
- no redirects followed, `BROKER_CIMD_TIMEOUT_SECONDS` for the whole fetch, at most
  `BROKER_CIMD_MAX_BYTES` read;
- documents are cached for `BROKER_CIMD_CACHE_SECONDS`, at most `BROKER_CIMD_CACHE_ENTRIES`
  of them (least recently used go first); failures are not cached.

CIMD clients are public clients (PKCE); a document that asks for a client secret is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from broker.config import Settings
from broker.errors import ConfigError
from broker.oauth.errors import OAuthError

MAX_CLIENT_ID = 2048
MAX_REDIRECT_URIS = 20
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class OAuthClient:
    client_id: str
    redirect_uris: tuple[str, ...]
    agent: str
    name: str | None = None
    secret_sha256: str | None = None  # set: a confidential client
    via: str = "registered"  # registered | cimd

    @property
    def confidential(self) -> bool:
        return self.secret_sha256 is not None

    def redirect_allowed(self, uri: str) -> bool:
        """Exact match, except that a loopback http redirect may use any port (RFC 8252 section 7.3)."""
        if "#" in uri or len(uri) > 2048:
            return False  # RFC 6749 section 3.1.2: a redirection endpoint has no fragment
        if uri in self.redirect_uris:
            return True
        try:
            asked = urlsplit(uri)
            asked_port = asked.port
        except ValueError:
            return False
        if asked.username is not None or asked.password is not None or asked_port is None:
            return False
        if asked.scheme != "http" or asked.hostname not in ("127.0.0.1", "::1"):
            return False
        for known in self.redirect_uris:
            k = urlsplit(known)
            if (k.scheme, k.hostname, k.path, k.query) == (asked.scheme, asked.hostname, asked.path, asked.query):
                return True
        return False

    def secret_matches(self, secret: str) -> bool:
        if self.secret_sha256 is None:
            return False
        return hmac.compare_digest(hashlib.sha256(secret.encode()).hexdigest(), self.secret_sha256)


def _refuse(code: str, message: str) -> OAuthError:
    return OAuthError("invalid_client", message, code=code, status=401)


def _check_redirect_uris(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_REDIRECT_URIS:
        raise ValueError(f"{where}: redirect_uris must be a list of 1 to {MAX_REDIRECT_URIS} URLs")
    for uri in value:
        parts = urlsplit(uri) if isinstance(uri, str) and len(uri) <= 2048 else None
        if parts is None or parts.scheme not in ("https", "http") or not parts.netloc or parts.fragment:
            raise ValueError(f"{where}: each redirect URI must be an absolute http(s) URL without a fragment")
        if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
            raise ValueError(f"{where}: a plain http redirect URI must be on loopback (RFC 8252)")
    return tuple(value)


def registered_clients(settings: Settings) -> dict[str, OAuthClient]:
    """BROKER_OAUTH_CLIENTS, checked once at start."""
    if not settings.oauth_clients.strip():
        return {}
    try:
        raw = json.loads(settings.oauth_clients)
    except ValueError:
        raise ConfigError("BROKER_OAUTH_CLIENTS must be a JSON object") from None
    if not isinstance(raw, dict):
        raise ConfigError("BROKER_OAUTH_CLIENTS must be a JSON object")
    out: dict[str, OAuthClient] = {}
    for client_id, entry in raw.items():
        where = f"BROKER_OAUTH_CLIENTS[{client_id!r}]"
        if not isinstance(entry, dict) or not 1 <= len(client_id) <= 255 or not client_id.isprintable():
            raise ConfigError(f"{where} must be an object under a printable client id")
        unknown = set(entry) - {"redirect_uris", "client_secret_sha256", "client_name", "agent"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            uris = _check_redirect_uris(entry.get("redirect_uris"), where)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        digest = entry.get("client_secret_sha256")
        if digest is not None and (not isinstance(digest, str) or len(digest) != 64
                                   or any(c not in "0123456789abcdef" for c in digest.lower())):
            raise ConfigError(f"{where}: client_secret_sha256 must be 64 hex characters")
        out[client_id] = OAuthClient(client_id=client_id, redirect_uris=uris,
                                     agent=str(entry.get("agent") or settings.mcp_agent),
                                     name=entry.get("client_name"), secret_sha256=digest.lower() if digest else None)
    return out


def is_cimd_url(client_id: str) -> bool:
    return client_id.startswith(("https://", "http://"))


def _public(address: str, allow_loopback: bool) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return allow_loopback
    return not (ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
                or not ip.is_global)


class ClientDirectory:
    """Resolves client ids; one per broker process."""

    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self.registered = registered_clients(settings)
        self._cache: OrderedDict[str, tuple[float, OAuthClient]] = OrderedDict()
        self._lock = threading.Lock()
        self._transport = transport

    def resolve(self, client_id: str | None) -> OAuthClient:
        if not client_id:
            raise OAuthError("invalid_request", "client_id is required", code="missing-parameter")
        if client_id in self.registered:
            return self.registered[client_id]
        if not is_cimd_url(client_id):
            raise _refuse("unknown-client", "client_id is neither a registered client nor a metadata document URL")
        return self._cimd(client_id)

    def _cimd(self, url: str) -> OAuthClient:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(url)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(url)
                return hit[1]
        client = self._fetch(url)
        if self.settings.cimd_cache_seconds > 0:
            with self._lock:
                self._cache[url] = (now + self.settings.cimd_cache_seconds, client)
                self._cache.move_to_end(url)
                while len(self._cache) > self.settings.cimd_cache_entries:
                    self._cache.popitem(last=False)
        return client

    def _target(self, url: str) -> tuple[str, str, int, str]:
        """(scheme, host, port, the address to connect to), or the refusal."""
        allow_loopback = self.settings.cimd_allow_loopback
        if len(url) > MAX_CLIENT_ID or not url.isascii() or any(c.isspace() or ord(c) < 0x21 for c in url):
            raise _refuse("invalid-client-metadata-url", "client_id is not a usable URL")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise _refuse("invalid-client-metadata-url", "client_id is not a usable URL") from None
        host = parts.hostname or ""
        if parts.scheme != "https" and not (parts.scheme == "http" and allow_loopback):
            raise _refuse("invalid-client-metadata-url", "a client_id URL must be https")
        if parts.username is not None or parts.password is not None or parts.fragment or "#" in url:
            raise _refuse("invalid-client-metadata-url", "a client_id URL has no user info and no fragment")
        segments = parts.path.split("/")
        if parts.path in ("", "/") or "." in segments or ".." in segments or "%2e" in parts.path.lower():
            raise _refuse("invalid-client-metadata-url", "a client_id URL needs a path, without dot segments")
        if not host:
            raise _refuse("invalid-client-metadata-url", "client_id is not a usable URL")
        port = port or (443 if parts.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise _refuse("client-metadata-unreachable", "the client_id URL's host does not resolve") from None
        addresses = sorted({info[4][0] for info in infos})
        if not addresses or not all(_public(str(a), allow_loopback) for a in addresses):
            # Every address must be public: a name with one private address is a way in.
            raise _refuse("client-metadata-private-address",
                          "the client_id URL resolves to a private, loopback or link-local address")
        return parts.scheme, host, port, str(addresses[0])

    def _fetch(self, url: str) -> OAuthClient:
        scheme, host, port, address = self._target(url)
        parts = urlsplit(url)
        literal = f"[{address}]" if ":" in address else address
        pinned = urlunsplit((scheme, f"{literal}:{port}", parts.path, parts.query, ""))
        limit = self.settings.cimd_max_bytes
        body = bytearray()
        try:
            with httpx.Client(timeout=self.settings.cimd_timeout_seconds, follow_redirects=False,
                              transport=self._transport, trust_env=False) as http:
                deadline = time.monotonic() + self.settings.cimd_timeout_seconds
                with http.stream("GET", pinned, headers={"Host": parts.netloc, "Accept": "application/json"},
                                 extensions={"sni_hostname": host}) as response:
                    if response.status_code != 200:
                        raise _refuse("client-metadata-unavailable",
                                      f"the client metadata document answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    if declared is not None and declared.isdigit() and int(declared) > limit:
                        raise _refuse("client-metadata-too-large", f"the client metadata document exceeds {limit} bytes")
                    for chunk in response.iter_bytes():
                        body.extend(chunk)
                        if len(body) > limit:
                            raise _refuse("client-metadata-too-large",
                                          f"the client metadata document exceeds {limit} bytes")
                        if time.monotonic() > deadline:
                            raise _refuse("client-metadata-unreachable", "the client metadata document came too slowly")
        except httpx.HTTPError:
            raise _refuse("client-metadata-unreachable", "the client metadata document could not be fetched") from None
        return self._parse(url, bytes(body))

    def _parse(self, url: str, body: bytes) -> OAuthClient:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise _refuse("invalid-client-metadata", "the client metadata document is not JSON") from None
        if not isinstance(doc, dict):
            raise _refuse("invalid-client-metadata", "the client metadata document is not a JSON object")
        if doc.get("client_id") != url:
            raise _refuse("client-id-mismatch", "the client metadata document's client_id is not its own URL")
        if "client_secret" in doc or "client_secret_expires_at" in doc:
            raise _refuse("invalid-client-metadata", "a client metadata document carries no client secret")
        method = doc.get("token_endpoint_auth_method", "none")
        if method != "none":
            raise _refuse("invalid-client-metadata", "metadata document clients are public: token_endpoint_auth_method "
                          "must be none")
        try:
            uris = _check_redirect_uris(doc.get("redirect_uris"), "redirect_uris")
        except ValueError as exc:
            raise _refuse("invalid-client-metadata", str(exc)) from None
        name = doc.get("client_name")
        if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= 256 or not name.isprintable()):
            raise _refuse("invalid-client-metadata", "client_name must be printable text (no control, bidirectional "
                          "or invisible characters) of at most 256 characters")
        return OAuthClient(client_id=url, redirect_uris=uris, agent=self.settings.mcp_agent, name=name, via="cimd")
