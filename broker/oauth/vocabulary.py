"""What the authorization-code flow's two halves (`authorize`: the request and the consent;
`tokens`: the code, the refresh, the revocation) and the ID-JAG grant share: the issuer, which
access of an MCP server a scope asks for, the one resource of a request, the client's session
label, and the digest tokens and codes are kept as.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from broker.errors import BrokerError
from broker.oauth.errors import OAuthError
from broker.policy import CompiledPolicy, canonical_resource
from broker.policy.compiled import tier_rank
from broker.runtime import Broker

_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,128}$")  # RFC 6749 section 3.3
# Scopes a client may add that ask for nothing of the MCP server.
IGNORED_SCOPES = frozenset({"offline_access"})


def issuer(broker: Broker) -> str:
    return broker.settings.issuer.rstrip("/")


def access_scopes(options: Any, name: str) -> frozenset[str]:
    scope = options.get("scope") if hasattr(options, "get") else None
    return frozenset(str(scope).split()) if scope else frozenset({name})


def choose_access(policy: CompiledPolicy, resource: str, scope: str | None) -> tuple[str, str]:
    """(access name, the scope it grants): the narrowest access of the resource's rule whose
    scopes (its `scope`, or its name) cover every scope asked for; an access name may be asked
    for by name. Ties go to the lower tier."""
    rule = policy.match_resource(resource)
    if rule is None:
        raise OAuthError("invalid_target", "the policy knows no MCP server or resource by that name",
                         code="unknown-resource")
    asked = frozenset((scope or "").split()) - IGNORED_SCOPES
    if not asked:
        raise OAuthError("invalid_scope", "scope is required: the scopes of the MCP server to use",
                         code="missing-scope")
    if len(asked) > 32 or not all(_SCOPE_TOKEN.match(s) for s in asked):
        raise OAuthError("invalid_scope", "scope is not a list of scope tokens", code="invalid-scope")
    fits = []
    for name, access in rule.access.items():
        granted = access_scopes(access.options, name)
        if asked <= granted | {name}:
            fits.append((len(granted), tier_rank(access.tier), name, granted))
    if not fits:
        raise OAuthError("invalid_scope", "no access of this MCP server covers that scope", code="unknown-scope")
    _, _, name, granted = min(fits)
    return name, " ".join(sorted(granted))


def resource_of(value: str) -> str:
    try:
        return canonical_resource(value)
    except BrokerError as exc:
        raise OAuthError("invalid_target", exc.message, code="invalid-resource") from None


def one_resource(params: dict[str, list[str]]) -> str:
    resources = [r for r in params.get("resource", []) if r]
    if len(resources) != 1:
        raise OAuthError("invalid_target", "exactly one resource (RFC 8707), the MCP server's URL, is required",
                         code="one-resource-per-request")
    return resource_of(resources[0])


def client_label(client_id: str) -> str:
    """The session label naming the client its tokens were issued to (labels are short; ids may not be)."""
    return client_id if len(client_id) <= 200 else "sha256:" + digest(client_id)


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()
