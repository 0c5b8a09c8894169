"""RFC 7009 revocation of tokens the broker issued: the same revocation as DELETE on the capability."""

from __future__ import annotations

from sqlmodel import select

from broker.db import transaction
from broker.errors import BrokerError, NotFound, Unauthenticated
from broker.identity.callers import Caller
from broker.leases import queries
from broker.leases.revocation import revoke_leases
from broker.models import Lease
from broker.oauth.errors import OAuthError, from_broker_error
from broker.providers.base import fingerprint
from broker.runtime import Broker

TOKEN_TYPE_HINTS = ("access_token", "refresh_token")


def find_capability(broker: Broker, token: str) -> str | None:
    """The capability a token belongs to: a native token by its signed `jti`, any other by its fingerprint."""
    try:
        claims = broker.keyring.verify(token, audience=None, issuer=broker.settings.issuer, token_use="capability")  # noqa: S106  # the token's kind, not a secret
        jti = str(claims.get("jti"))
    except Unauthenticated:
        jti = None  # expired, foreign or not a JWT at all: the fingerprint still finds what the broker issued
    with transaction(broker.engine) as db:
        if jti is not None and db.get(Lease, jti) is not None:
            return jti
        return db.exec(select(Lease.id).where(Lease.fingerprint == fingerprint(token))).first()


def revoke_token(broker: Broker, caller: Caller | None, token: str) -> str | None:
    """Revokes what `token` grants. Unknown tokens are not an error (RFC 7009 2.2).

    A caller who authenticates is judged as DELETE judges them. A request without credentials is
    a public client's (client authentication `none`, as discovery says): holding the token is the
    right to end it, as holding it is the right to use it, so it is revoked for the token holder.
    """
    capability_id = find_capability(broker, token)
    if capability_id is None:
        return None
    if caller is None:
        revoke_leases(broker, [capability_id], reason="revoked-by-token-holder", actor="token-holder")
        return capability_id
    try:
        queries.revoke(broker, caller, capability_id)
    except NotFound:
        # The token is real but not the caller's to revoke: refused, and nothing changes (RFC 7009 2.1).
        raise OAuthError("unauthorized_client", "this caller may not revoke this token", code="not-your-token",
                         status=403) from None
    except BrokerError as exc:
        raise from_broker_error(exc) from None
    return capability_id
