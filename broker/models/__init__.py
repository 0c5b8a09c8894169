"""Every table, importable from here so Alembic and the services see the same metadata.

Domain services live in their own packages (sessions/, leases/, approvals/, audit/); the
tables are here because they reference each other and migrations need them all at once.
Importing this package registers every table on `SQLModel.metadata`: one module per domain
(sessions, leases, approvals, audit, ssf, oauth, delivery), each re-exported below.
"""

from broker.models.approvals import Approval, ApprovalDecision, BreakGlassReview, JitGrant
from broker.models.audit import (
    AuditChain,
    AuditCheckpoint,
    AuditCosignature,
    AuditHead,
    AuditLeaf,
    AuditRecord,
    AuditTree,
    AuditWitnessState,
)
from broker.models.delivery import DpopProofSeen, IdempotencyRecord, OutboxMessage, WebhookDelivery
from broker.models.leases import Lease, NewLease
from broker.models.oauth import BrowserSession, OAuthAuthorization, OAuthRefreshToken
from broker.models.sessions import AnySession, SessionLiveDelta, SessionRefusal, SessionRow, SessionSnapshot
from broker.models.ssf import SsfEvent, SsfStream, SsfSubject

__all__ = [
    "AnySession",
    "Approval",
    "ApprovalDecision",
    "AuditChain",
    "AuditCheckpoint",
    "AuditCosignature",
    "AuditHead",
    "AuditLeaf",
    "AuditRecord",
    "AuditTree",
    "AuditWitnessState",
    "BreakGlassReview",
    "BrowserSession",
    "DpopProofSeen",
    "IdempotencyRecord",
    "JitGrant",
    "Lease",
    "NewLease",
    "OAuthAuthorization",
    "OAuthRefreshToken",
    "OutboxMessage",
    "SessionLiveDelta",
    "SessionRefusal",
    "SessionRow",
    "SessionSnapshot",
    "SsfEvent",
    "SsfStream",
    "SsfSubject",
    "WebhookDelivery",
]
