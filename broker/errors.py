"""The broker's error tree: every failure a caller can see, with its HTTP status and code.

    BrokerError                      500 internal-error
    ├── InternalError                500 internal-error
    ├── InvalidRequest               400 invalid-request
    │   └── ValidationFailed         422 validation-failed
    ├── Unauthenticated              401 invalid-token
    ├── IdentityProviderUnavailable  503 identity-provider-unavailable (OIDC discovery/JWKS unreadable)
    ├── Forbidden                    403 forbidden          (who you are may not do this)
    ├── Denied                       403 <decision reason>  (the policy said no)
    ├── NotFound                     404 not-found
    ├── Conflict                     409 conflict
    ├── BudgetExceeded               429 budget-exceeded
    ├── AuditWriteFailed             500 audit-write-failed (fail closed)
    ├── ConfigError                  --  refused at start, never served
    ├── PolicyError                  400 policy-invalid     (line-precise problems)
    └── ProviderError                502 provider-error
        ├── ProviderRejected         502 provider-rejected  (the backend said no)
        ├── ProviderUnavailable      503 provider-unavailable (unreachable, timed out, 5xx)
        └── ProviderMisconfigured    500 provider-misconfigured

Codes are kebab-case and stable: clients branch on `code`, never on `message`.
"""

from __future__ import annotations

from typing import Any


class BrokerError(Exception):
    status: int = 500
    code: str = "internal-error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class InternalError(BrokerError):
    """Something inside the broker is wrong; the caller learns nothing more."""


class InvalidRequest(BrokerError):
    status = 400
    code = "invalid-request"


class ValidationFailed(InvalidRequest):
    status = 422
    code = "validation-failed"


class Unauthenticated(BrokerError):
    status = 401
    code = "invalid-token"


class IdentityProviderUnavailable(BrokerError):
    """The OIDC issuer's discovery document or keys cannot be read: no token can be checked."""

    status = 503
    code = "identity-provider-unavailable"


class Forbidden(BrokerError):
    status = 403
    code = "forbidden"


class Denied(BrokerError):
    """The policy denied the request; `code` is the decision's reason."""

    status = 403
    code = "denied"


class NotFound(BrokerError):
    status = 404
    code = "not-found"


class Conflict(BrokerError):
    status = 409
    code = "conflict"


class BudgetExceeded(BrokerError):
    status = 429
    code = "budget-exceeded"


class AuditWriteFailed(BrokerError):
    status = 500
    code = "audit-write-failed"


class ConfigError(BrokerError):
    code = "config-invalid"


class PolicyError(BrokerError):
    """A policy file that cannot be loaded. `problems` holds one line-precise entry each."""

    status = 400
    code = "policy-invalid"

    def __init__(self, message: str, problems: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message, problems=problems or [])
        self.problems = problems or []


class ProviderError(BrokerError):
    status = 502
    code = "provider-error"


class ProviderRejected(ProviderError):
    status = 502
    code = "provider-rejected"


class ProviderUnavailable(ProviderError):
    status = 503
    code = "provider-unavailable"


class ProviderMisconfigured(ProviderError):
    status = 500
    code = "provider-misconfigured"
