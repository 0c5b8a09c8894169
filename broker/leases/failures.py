"""When a mint goes wrong, failing closed: a backend that refused or failed leaves its `minting`
lease failed with its record (and, for a refusal, the idempotency key's stored answer); a
credential minted whose activation did not commit is revoked at once, never handed out
unrecorded (and a lease revoked while minting is finished with it).
"""

from __future__ import annotations

import logging

from broker.audit.events import DecisionRef
from broker.audit.service import append
from broker.db import transaction, utcnow
from broker.errors import BrokerError
from broker.leases import idempotency, records
from broker.leases.revocation import finish_revocation
from broker.leases.vocabulary import CapabilityAsk, LeaseStatus
from broker.models import Lease, SessionRow, SessionSnapshot
from broker.providers.base import Grant, Minted, Provider, RevokeTarget
from broker.runtime import Broker

log = logging.getLogger("broker.leases")


def record_failed_mint(broker: Broker, session: SessionSnapshot, ask: CapabilityAsk, grant: Grant, provider_name: str,
                       record: DecisionRef, idem_key: str | None, failure: BrokerError) -> None:
    """The backend refused or failed: the `minting` lease fails, with its record (and, for a
    refusal, the key's stored answer)."""
    with transaction(broker.engine) as db:
        lease = db.get(Lease, grant.capability_id, with_for_update=True)
        assert lease is not None  # noqa: S101  # the lease was reserved in this process before the mint
        lease.status, lease.status_reason, lease.ended_at = LeaseStatus.FAILED, failure.code, utcnow()
        db.add(lease)
        if failure.status < 500:
            idempotency.finish(db, broker, idempotency.reload(db, session.id, idem_key), failure)
        append(db, records.mint_failed_event(session, ask, grant, provider_name, record, failure))


def revoke_unrecorded(broker: Broker, provider: Provider, grant: Grant, minted: Minted) -> None:
    """The credential exists but its activation did not commit: kill it before anyone uses it."""
    target = RevokeTarget(
        capability_id=grant.capability_id, session_id=grant.session_id, resource=grant.resource,
        access=grant.access, handle=minted.handle, expires_at=minted.expires_at,
        revocation_secret=minted.revocation_secret,
    )
    try:
        result = provider.revoke(target)
    except Exception:
        log.exception("revoking an unrecorded credential for %s failed; the reconciler will retry", grant.capability_id)
        return
    try:
        with transaction(broker.engine) as db:
            lease = db.get(Lease, grant.capability_id, with_for_update=True)
            if lease is not None and lease.status == LeaseStatus.MINTING:
                lease.status, lease.status_reason, lease.ended_at = LeaseStatus.FAILED, "activation-failed", utcnow()
                db.add(lease)
            elif lease is not None and lease.status == LeaseStatus.REVOKE_PENDING and lease.handle is None:
                # Revoked (teardown) while minting: now it really is.
                lease.handle, lease.fingerprint = minted.handle, minted.fingerprint
                session = db.get(SessionRow, lease.session_id)
                finish_revocation(db, lease, session, lease.revoke_reason or "revoked", "broker", utcnow(), result=result)
    except Exception:
        log.exception("could not mark %s failed; the reconciler will", grant.capability_id)
