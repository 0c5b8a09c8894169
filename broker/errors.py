"""The broker's error tree: every failure a caller can see, with its HTTP status and code.

    BrokerError                      500 internal-error
    ├── InternalError                500 internal-error
    ├── InvalidRequest               400 invalid-request
    │   ├── InvalidPrincipal         400 invalid-principal (no canonical form; 401 where it is a token's claim)
    │   └── ApprovalTooLarge         422 approval-too-large (approvals/limits.py)
    ├── Unauthenticated              401 invalid-token
    ├── IdentityProviderUnavailable  503 identity-provider-unavailable (OIDC discovery/JWKS unreadable)
    ├── Forbidden                    403 forbidden          (who you are may not do this)
    ├── Denied                       403 <decision reason>  (the policy said no)
    ├── NotFound                     404 not-found
    ├── Conflict                     409 conflict
    ├── BudgetExceeded               429 budget-exceeded
    │   └── ApprovalBudgetExceeded   429 approval-budget-exceeded (approvals/limits.py)
    ├── DatabaseUnavailable          503 database-unavailable (connection lost, pool timeout, read-only failover)
    ├── AuditWriteFailed             500 audit-write-failed (fail closed; 503 when the database is the cause)
    ├── ConfigError                  --  refused at start, never served
    ├── PolicyError                  400 policy-invalid     (line-precise problems)
    └── ProviderError                502 provider-error
        ├── ProviderRejected         502 provider-rejected  (the backend said no)
        ├── ProviderUnavailable      503 provider-unavailable (unreachable, timed out, 5xx)
        └── ProviderMisconfigured    500 provider-misconfigured

Every 503 carries `Retry-After` (the class's `retry_after`, in seconds): an outage, not a fault
of the broker or the caller. broker/outages.py recognises outages the code did not translate (a
driver's connection error reaching the app's handler) and answers them as the two 503s above.

Codes are kebab-case and stable: clients branch on `code`, never on `message`. A body that
does not match the schema is answered by the app's validation handler (422 validation-failed).
"""

from __future__ import annotations

from typing import Any


class BrokerError(Exception):
    """Every error a caller can see. A subclass names its status and code in its header:
    `class NotFound(BrokerError, status=404, code="not-found")`."""

    status: int = 500
    code: str = "internal-error"
    retry_after: int | None = None  # seconds, for the Retry-After header of an outage (503)

    def __init_subclass__(cls, *, status: int | None = None, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status
        if code is not None:
            cls.code = code

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details
        self.headers: dict[str, str] = {"Retry-After": str(self.retry_after)} if self.retry_after else {}

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class InternalError(BrokerError):
    """Something inside the broker is wrong; the caller learns nothing more."""


class InvalidRequest(BrokerError, status=400, code="invalid-request"):
    """The request is malformed beyond what the schema checks (a bad resource URI, say)."""


class InvalidPrincipal(InvalidRequest, code="invalid-principal"):
    """A human principal with no canonical form (see broker.principals); never changed to fit."""


class Unauthenticated(BrokerError, status=401, code="invalid-token"):
    """No credentials, or credentials the broker does not accept."""


class Forbidden(BrokerError, status=403, code="forbidden"):
    """Who the caller is may not do this."""


class IdentityProviderUnavailable(BrokerError, status=503, code="identity-provider-unavailable"):
    """The OIDC issuer's discovery document or keys cannot be read: no token can be checked."""

    retry_after = 2


class Denied(BrokerError, status=403, code="denied"):
    """The policy denied the request; `code` is the decision's reason."""


class NotFound(BrokerError, status=404, code="not-found"):
    """Absent, or not the caller's to see: the same answer, so ids are no oracle."""


class Conflict(BrokerError, status=409, code="conflict"):
    """The state does not allow it now (a replayed webhook, a used approval, ...)."""


class BudgetExceeded(BrokerError, status=429, code="budget-exceeded"):
    """A per-session budget is spent."""


class DatabaseUnavailable(BrokerError, status=503, code="database-unavailable"):
    """The database cannot be reached or cannot take writes just now (restart, failover, pool
    exhausted): nothing was carried out, and the same request (same Idempotency-Key) may be sent again."""

    retry_after = 1  # a restart or failover is back within seconds; clients back off from here


class AuditWriteFailed(BrokerError, status=500, code="audit-write-failed"):
    """The audit record could not be written, so the request was not carried out."""


class ConfigError(BrokerError, code="config-invalid"):
    """Refused at start: the broker does not serve with a bad configuration."""


class PolicyError(BrokerError, status=400, code="policy-invalid"):
    """A policy file that cannot be loaded. `problems` holds one line-precise entry each."""

    def __init__(self, message: str, problems: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message, problems=problems or [])
        self.problems = problems or []


class ProviderError(BrokerError, status=502, code="provider-error"):
    """A backend failed; providers raise one of the three below."""


class ProviderRejected(ProviderError, status=502, code="provider-rejected"):
    """The backend said no."""


class ProviderUnavailable(ProviderError, status=503, code="provider-unavailable"):
    """The backend could not be reached, timed out or answered 5xx: worth retrying."""

    retry_after = 2


class ProviderMisconfigured(ProviderError, status=500, code="provider-misconfigured"):
    """The broker's own configuration for the backend is wrong or missing."""
