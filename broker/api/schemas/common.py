"""What every body of the HTTP API shares: the value types (resource, access, agent, principal,
ids, labels), `Strict` (unknown fields refused, 422), the error body, and the health answers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from broker import jsonbounds
from broker.ids import APPROVAL_ID_PATTERN, SESSION_ID_PATTERN

RESOURCE_PATTERN = r"^[a-z][a-z0-9+.-]{0,31}://[!-~]{1,480}$"

Resource = Annotated[str, StringConstraints(pattern=RESOURCE_PATTERN, max_length=512)]
AccessName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$|^\*$")]
AgentName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
# Length only here: the canonical form (broker.principals) is checked by the service,
# so every principal that does not fit gets one answer, 400 invalid-principal.
Principal = Annotated[str, StringConstraints(min_length=1, max_length=320)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=256)]
LabelKey = Annotated[str, StringConstraints(max_length=64)]
LabelValue = Annotated[str, StringConstraints(max_length=256)]
SessionId = Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN)]
ApprovalId = Annotated[str, StringConstraints(pattern=APPROVAL_ID_PATTERN)]
MAX_PARAMETERS_BYTES = jsonbounds.PARAMETERS_MAX_BYTES

RECEIPTS_DESCRIPTION = ("one per capability the call acted on: what really happened to its credential "
                        "(`revoked`, `revoke_pending`, `expires_naturally`, `already_ended`)")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` entry for the errors a route may answer with."""
    return {status: {"model": ErrorResponse} for status in statuses}


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Any] = Field(description="database, policy, and each provider: {ok, detail, required}")


class Jwks(BaseModel):
    keys: list[dict[str, str]]
