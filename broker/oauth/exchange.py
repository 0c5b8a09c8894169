"""RFC 8693 token exchange: a session token in, one capability out, through the one decision path."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

from broker.audit.events import machine_caller
from broker.db import utcnow
from broker.errors import BrokerError, Unauthenticated
from broker.identity.binding import check_session_workload
from broker.identity.callers import Caller, session_token_claims
from broker.identity.oidc import unverified_issuer
from broker.identity.ratelimit import RateLimiter
from broker.identity.workload import WORKLOAD_HEADER
from broker.ids import APPROVAL_ID_PATTERN
from broker.leases.outcomes import PendingApproval
from broker.leases.service import request_capability
from broker.leases.vocabulary import CapabilityAsk
from broker.oauth import dpop
from broker.oauth.errors import OAuthError, from_broker_error
from broker.oauth.form import one
from broker.runtime import Broker
from broker.sessions import liveness

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
TT_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105  # an RFC 8693 token type URI, not a secret
TT_JWT = "urn:ietf:params:oauth:token-type:jwt"
# Broker-defined token types (RFC 8693 section 3 allows URIs of one's own) for what is not one bearer string.
TT_AWS = "urn:jit-broker:token-type:aws-sts"
TT_VAULT_SECRET = "urn:jit-broker:token-type:vault-secret"  # noqa: S105  # a token type URI, not a secret
SUBJECT_TOKEN_TYPES = (TT_JWT, TT_ACCESS_TOKEN)
DETAILS_TYPE = "jit-broker-capability"
DEFAULT_PURPOSE = "oauth token exchange"
_ACCESS = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$|^\*$")
_APPROVAL_ID = re.compile(APPROVAL_ID_PATTERN)
_DETAIL_KEYS = frozenset({"type", "resource", "access", "ttl_seconds", "purpose", "locations", "actions"})


def agent_from_subject_token(request: Request, broker: Broker, token: str) -> Caller:
    """The subject token must be a live session token of this broker; anything else is invalid_grant."""
    if token.count(".") != 2 or len(token) > 8192:
        raise OAuthError("invalid_grant", "subject_token is not a session token of this broker", code="invalid-token")
    if broker.oidc is not None and unverified_issuer(token) != broker.settings.issuer:
        raise OAuthError("invalid_grant", "subject_token is not a session token of this broker", code="invalid-token")
    try:
        claims = session_token_claims(token, keyring=broker.keyring, issuer=broker.settings.issuer,
                                      audience=broker.settings.audience)
    except Unauthenticated as exc:
        raise OAuthError("invalid_grant", f"subject_token: {exc.message}", code=exc.code) from None
    caller = Caller(kind="agent", name=str(claims["sub"]), session_id=str(claims["sid"]))
    limiter: RateLimiter = request.app.state.rate_limiter
    try:
        limiter.check(broker.policies.current.rate_limits, session_id=caller.session_id or "", agent=caller.name)
        # A session bound to a workload: its runtime's token in X-Workload-Token, as on the REST API.
        runtime = check_session_workload(broker, session_id=caller.session_id or "", agent=caller.name,
                                         binding=claims.get("wl"), presented=request.headers.get(WORKLOAD_HEADER))
    except BrokerError as exc:
        raise from_broker_error(exc) from None
    if runtime is not None:
        machine_caller.set(runtime.audit())  # this thread runs the whole exchange: its records carry it
    idle = claims.get(liveness.CLAIM)  # stall: the session token presented here is a sign of life too
    if liveness.touch_due(broker, caller.session_id or "", idle):
        liveness.touch(broker, caller.session_id or "", int(idle))  # type: ignore[call-overload]
    return caller


def _ttl(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit() and len(value) <= 6:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 86400:
        raise OAuthError("invalid_request", "ttl_seconds must be an integer from 1 to 86400", code="invalid-ttl")
    return value


def _purpose(value: Any) -> str:
    if value is None:
        return DEFAULT_PURPOSE
    if not isinstance(value, str) or not 1 <= len(value) <= 1000:
        raise OAuthError("invalid_request", "purpose must be 1 to 1000 characters", code="invalid-purpose")
    return value


def _access(value: Any, error: str = "invalid_scope") -> str:
    if not isinstance(value, str) or not _ACCESS.match(value):
        raise OAuthError(error, "one access name is needed, e.g. scope=read", code="invalid-access")
    return value


def _resource(value: Any, error: str = "invalid_target") -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 512 or "://" not in value:
        raise OAuthError(error, "resource must be one absolute URI of the broker's resources, e.g. jwt://payments-api",
                         code="invalid-resource")
    return value


def _from_details(raw: str) -> tuple[str, str, int | None, str]:
    """RFC 9396: exactly one object of the broker's type."""
    error = "invalid_authorization_details"
    try:
        details = json.loads(raw)
    except (ValueError, RecursionError):
        raise OAuthError(error, "authorization_details is not JSON", code="invalid-authorization-details") from None
    if not isinstance(details, list) or len(details) != 1 or not isinstance(details[0], dict):
        raise OAuthError(error, "authorization_details must be an array of exactly one object",
                         code="invalid-authorization-details")
    detail = details[0]
    if detail.get("type") != DETAILS_TYPE:
        raise OAuthError(error, f"the only authorization_details type is {DETAILS_TYPE}",
                         code="unknown-authorization-details-type")
    unknown = sorted(set(detail) - _DETAIL_KEYS)
    if unknown:
        raise OAuthError(error, f"unknown member(s) {', '.join(unknown)[:200]}", code="invalid-authorization-details")
    # RFC 9396's common members are accepted as synonyms: locations = [resource], actions = [access].
    resource = detail.get("resource")
    if resource is None and isinstance(detail.get("locations"), list) and len(detail["locations"]) == 1:
        resource = detail["locations"][0]
    access = detail.get("access")
    if access is None and isinstance(detail.get("actions"), list) and len(detail["actions"]) == 1:
        access = detail["actions"][0]
    return (_resource(resource, error), _access(access, error), _ttl(detail.get("ttl_seconds")),
            _purpose(detail.get("purpose")))


def parse_ask(params: dict[str, list[str]]) -> tuple[str, CapabilityAsk, bool]:
    """(subject token, the capability asked for, whether it came as authorization_details)."""
    grant_type = one(params, "grant_type", required=True)
    if grant_type != GRANT_TYPE:
        raise OAuthError("unsupported_grant_type", f"the only grant type is {GRANT_TYPE}",
                         code="unsupported-grant-type")
    subject = one(params, "subject_token", required=True)
    subject_type = one(params, "subject_token_type", required=True)
    if subject_type not in SUBJECT_TOKEN_TYPES:
        raise OAuthError("invalid_request", "subject_token_type must be " + " or ".join(SUBJECT_TOKEN_TYPES),
                         code="unsupported-subject-token-type")
    for unsupported in ("actor_token", "actor_token_type", "audience"):
        if one(params, unsupported) is not None:
            raise OAuthError("invalid_request", f"{unsupported} is not supported; name the capability by resource",
                             code="unsupported-parameter")
    requested = one(params, "requested_token_type")
    if requested is not None and requested not in (TT_ACCESS_TOKEN, TT_JWT, TT_AWS, TT_VAULT_SECRET):
        raise OAuthError("invalid_request", "requested_token_type is not one the broker issues",
                         code="unsupported-token-type")
    approval_id = one(params, "approval_id")
    if approval_id is not None and not _APPROVAL_ID.match(approval_id):
        raise OAuthError("invalid_request", "approval_id is malformed", code="invalid-approval-id")
    details_raw = one(params, "authorization_details")
    resources = [r for r in params.get("resource", []) if r]
    scope = one(params, "scope")
    if details_raw is not None:
        if resources or scope:
            raise OAuthError("invalid_request", "name the capability by authorization_details or by resource and "
                             "scope, not both", code="ambiguous-request")
        resource, access, ttl, purpose = _from_details(details_raw)
        as_details = True
    else:
        if len(resources) != 1:
            raise OAuthError("invalid_target", "exactly one resource is exchanged per request",
                             code="one-resource-per-exchange")
        if scope is None or len(scope.split()) != 1:
            raise OAuthError("invalid_scope", "scope must be exactly one access name, e.g. scope=read",
                             code="invalid-access")
        resource, access = _resource(resources[0]), _access(scope)
        ttl, purpose = _ttl(one(params, "ttl_seconds")), _purpose(one(params, "purpose"))
        as_details = False
    ask = CapabilityAsk(resource=resource, access=access, purpose=purpose, ttl_seconds=ttl, approval_id=approval_id)
    return subject, ask, as_details


def _issued(credential: dict[str, Any]) -> tuple[str, str, str, dict[str, Any] | None]:
    """(access_token, issued_token_type, token_type, broker_credential or None)."""
    kind = credential.get("type")
    if kind == "jwt":
        return credential["token"], TT_ACCESS_TOKEN, "Bearer", None
    if kind in ("vault_token", "github_token"):
        # One bearer string, but its address (vault_addr, namespace) matters too: the whole credential rides along.
        return credential["token"], TT_ACCESS_TOKEN, "Bearer", credential
    if kind == "aws_sts":
        return credential.get("session_token", ""), TT_AWS, "N_A", credential
    if kind == "vault_secret":
        return str(credential.get("lease_id", "")), TT_VAULT_SECRET, "N_A", credential
    # A provider added later: still honest, the full credential and no bearer claim.
    return str(credential.get("token", "")), "urn:jit-broker:token-type:" + str(kind), "N_A", credential


def _expires_in(expires_at: str) -> int:
    when = datetime.strptime(expires_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return max(0, math.floor((when - utcnow()).total_seconds()))


def token_endpoint_url(broker: Broker) -> str:
    return broker.settings.public_base_url() + "/v1/oauth/token"


def exchange(request: Request, broker: Broker, params: dict[str, list[str]],
             idempotency_key: str | None) -> dict[str, Any]:
    subject, ask, _ = parse_ask(params)
    caller = agent_from_subject_token(request, broker, subject)
    proofs = request.headers.getlist("dpop")
    if len(proofs) > 1:
        raise OAuthError("invalid_dpop_proof", "one DPoP header at most", code="invalid-dpop-proof")
    if proofs:
        # Checked after the subject token, so nobody spends proofs (or database rows) unauthenticated.
        jkt = dpop.check_proof(proofs[0], method="POST", url=token_endpoint_url(broker),
                               first_use=dpop.DatabaseReplayCache(broker.engine).first_use)
        ask = replace(ask, confirmation_jkt=jkt)
    try:
        outcome = request_capability(broker, caller, ask, idempotency_key)
    except BrokerError as exc:
        raise from_broker_error(exc) from None
    if isinstance(outcome, PendingApproval):
        # RFC 8628's name for "not yet": retry with approval_id once a human has approved.
        raise OAuthError("authorization_pending", "the capability waits for a human's approval; retry with "
                         "approval_id once approved", code="approval-required",
                         **outcome.model_dump(mode="json", exclude={"status"}))
    body = outcome.model_dump(mode="json")
    access_token, issued_type, token_type, extra = _issued(body["credential"])
    if body["credential"].get("token_type") == "DPoP":
        token_type = "DPoP"  # RFC 9449 section 5: the token is bound to the proof's key  # noqa: S105  # the OAuth token_type name, not a secret
    detail = {"type": DETAILS_TYPE, "resource": body["resource"], "access": body["access"],
              "capability_id": body["capability_id"], "tier": body["tier"], "provider": body["provider"],
              "expires_at": body["expires_at"], "purpose": ask.purpose}
    if ask.ttl_seconds is not None:
        detail["ttl_seconds"] = ask.ttl_seconds
    answer: dict[str, Any] = {
        "access_token": access_token,
        "issued_token_type": issued_type,
        "token_type": token_type,
        "expires_in": _expires_in(body["expires_at"]),
        "scope": body["access"],
        "authorization_details": [detail],
    }
    if extra is not None:
        answer["broker_credential"] = extra
    return answer
