"""OAuth errors (RFC 6749 section 5.2): `error` is the RFC's name, `code` the broker's kebab-case reason."""

from __future__ import annotations

from typing import Any

from broker.errors import BrokerError, Unauthenticated

# Decision reasons that say "no such target" rather than "not you".
TARGET_CODES = frozenset({"invalid-resource", "unknown-resource", "resource-not-found"})
SCOPE_CODES = frozenset({"unknown-access"})
# Decision reasons that say "the subject token's session is over": the grant itself is no longer
# valid (RFC 6749 section 5.2, RFC 8693 section 2.2.2), so `invalid_grant` (400), not a denial.
GRANT_CODES = frozenset({"session-ended"})


class OAuthError(Exception):
    def __init__(self, error: str, description: str, *, code: str | None = None, status: int = 400,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status
        self.code = code or error.replace("_", "-")
        self.headers = headers or {}
        self.extra = extra

    def to_body(self) -> dict[str, Any]:
        return {"error": self.error, "error_description": self.description, "code": self.code, **self.extra}


def from_broker_error(exc: BrokerError) -> OAuthError:
    """The JSON API's refusal, said as an OAuth error; the broker's `code` rides along unchanged."""
    headers = dict(getattr(exc, "headers", None) or {})
    details = {k: v for k, v in exc.details.items() if k not in ("problems",)}
    if isinstance(exc, Unauthenticated) or exc.code in GRANT_CODES:
        return OAuthError("invalid_grant", exc.message, code=exc.code, **details)
    if exc.code in TARGET_CODES:
        return OAuthError("invalid_target", exc.message, code=exc.code, **details)
    if exc.code == "dpop-required":
        return OAuthError("invalid_dpop_proof", exc.message, code=exc.code, **details)
    if exc.code in SCOPE_CODES:
        return OAuthError("invalid_scope", exc.message, code=exc.code, **details)
    if exc.status >= 500:
        error = "temporarily_unavailable" if exc.status == 503 else "server_error"
        return OAuthError(error, exc.message, code=exc.code, status=exc.status, headers=headers, **details)
    if exc.status in (403, 409, 429):
        return OAuthError("access_denied", exc.message, code=exc.code, status=exc.status, headers=headers, **details)
    return OAuthError("invalid_request", exc.message, code=exc.code, **details)
