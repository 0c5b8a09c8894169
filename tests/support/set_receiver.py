"""A Security Event Token receiver on a loopback port (RFC 8935 push), verifying like a real one.

Each SET is checked with pyjwt against the broker's published JWKS (`PyJWKClient` on
`/.well-known/jwks.json`): signature (EdDSA, the header's `kid`), `typ: secevent+jwt`, `iss`,
`aud`, the claims SSF requires and forbids (`jti`, `iat`, `sub_id`, one event; no `sub`, no
`exp`), and `jti` never seen before. Answers are RFC 8935's: 202 when accepted, 400 with
`{"err", "description"}` when not, and 503 while the broker's JWKS cannot be fetched. A
replayed `jti` is acknowledged (202, as the RFC's receivers dedupe) and kept in `duplicates`
for the test to see.

It can start without listening (its port is bound, so a push is refused as by a receiver that
is down), fail the next N pushes with 503, refuse them with a 400, or require a bearer token.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest

SET_TYP = "secevent+jwt"


class SetReceiver:
    def __init__(self, *, audience: str, issuer: str, token: str | None = None, listening: bool = True) -> None:
        self.audience = audience
        self.issuer = issuer
        self.token = token
        self.jwks: jwt.PyJWKClient | None = None  # set by `trust(broker_url)` once the broker serves
        self.accepted: list[dict[str, Any]] = []  # {"header": ..., "claims": ..., "raw": ...}, in arrival order
        self.duplicates: list[str] = []  # jtis seen again
        self.rejected: list[str] = []  # what failed verification, and why
        self.requests = 0  # every POST that reached the receiver
        self.fail_next = 0  # answer 503 to this many pushes
        self.refuse_next = 0  # answer 400 (RFC 8935 invalid_request) to this many pushes
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.requests += 1
                    status, body = receiver._take(raw, dict(self.headers.items()))
                    receiver.arrived.notify_all()
                self.send_response(status)
                if body is not None:
                    data = json.dumps(body).encode()
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                else:
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        # Bound now (the port is known and reserved), listening only from `start()`.
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.server_bind()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        self.thread: threading.Thread | None = None
        if listening:
            self.start()

    def trust(self, broker_url: str) -> None:
        """Verify with the keys this broker publishes."""
        self.jwks = jwt.PyJWKClient(broker_url.rstrip("/") + "/.well-known/jwks.json", cache_keys=True)

    def start(self) -> None:
        self.server.server_activate()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _take(self, raw: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str] | None]:
        lower = {k.lower(): v for k, v in headers.items()}
        if self.fail_next > 0:
            self.fail_next -= 1
            return 503, None
        if self.refuse_next > 0:
            self.refuse_next -= 1
            return 400, {"err": "invalid_request", "description": "this receiver refuses the event"}
        if self.token is not None and lower.get("authorization") != f"Bearer {self.token}":
            self.rejected.append("authentication: wrong or missing bearer token")
            return 400, {"err": "authentication_failed", "description": "bearer token missing or wrong"}
        if lower.get("content-type") != "application/secevent+jwt":
            self.rejected.append(f"content type {lower.get('content-type')!r}")
            return 400, {"err": "invalid_request", "description": "expected application/secevent+jwt"}
        if self.jwks is None:
            return 503, None  # cannot fetch the keys yet: a transient failure, not a verdict on the SET
        try:
            header, claims = self.verify(raw.decode())
        except jwt.PyJWKClientConnectionError:
            return 503, None
        except Exception as exc:  # noqa: BLE001 - a receiver refuses anything it cannot verify
            self.rejected.append(f"{exc.__class__.__name__}: {exc}")
            return 400, {"err": "invalid_request", "description": str(exc)[:200]}
        if any(s["claims"]["jti"] == claims["jti"] for s in self.accepted):
            self.duplicates.append(claims["jti"])
            return 202, None
        self.accepted.append({"header": header, "claims": claims, "raw": raw.decode(), "accept": lower.get("accept")})
        return 202, None

    def verify(self, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        assert self.jwks is not None, "call trust(broker_url) first"
        header = jwt.get_unverified_header(token)
        if header.get("typ") != SET_TYP:
            raise ValueError(f"typ is {header.get('typ')!r}, not {SET_TYP}")
        key = self.jwks.get_signing_key_from_jwt(token)  # by the header's kid, from the broker's JWKS
        claims = jwt.decode(
            token, key.key,
            algorithms=["EdDSA"],  # the broker's keys are Ed25519; never the token's own choice
            audience=self.audience,
            issuer=self.issuer,
            options={"require": ["iss", "aud", "iat", "jti"], "verify_signature": True, "verify_aud": True,
                     "verify_iss": True, "verify_iat": True, "verify_exp": True},
        )
        if "sub" in claims or "exp" in claims:
            raise ValueError("SSF SETs carry neither sub nor exp")
        if not isinstance(claims.get("sub_id"), dict) or "format" not in claims["sub_id"]:
            raise ValueError("sub_id is not a subject identifier")
        if not isinstance(claims.get("events"), dict) or len(claims["events"]) != 1:
            raise ValueError("events must hold exactly one event")
        return header, claims

    def wait_for(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.accepted) >= count, timeout)
            return list(self.accepted)

    def wait_for_requests(self, count: int, timeout: float = 30) -> int:
        with self.arrived:
            self.arrived.wait_for(lambda: self.requests >= count, timeout)
            return self.requests

    def events(self, uri_tail: str) -> list[dict[str, Any]]:
        """The accepted SETs whose event type URI ends with `uri_tail` (claims only)."""
        return [s["claims"] for s in self.accepted if next(iter(s["claims"]["events"])).endswith(uri_tail)]

    def close(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def set_receivers() -> Iterator[list[SetReceiver]]:
    """Append receivers here; each is closed after the test."""
    made: list[SetReceiver] = []
    yield made
    for receiver in made:
        receiver.close()
