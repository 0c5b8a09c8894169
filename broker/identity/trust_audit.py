"""The audit record of a refused workload token: who claimed to call, and why they were refused.

The issuer and subject here are what the token claimed, unverified (that is why it was refused),
bounded in length and marked `verified: false`; they are for the person reading the log, never
for a decision. A refusal is audited even though anyone can send one: the failures the trust
rules exist to catch (a pipeline of another repository, a rotated-out key) must be visible.
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from broker.audit.events import AgentRef, AuditEvent, RequestRef
from broker.audit.service import append
from broker.db import transaction
from broker.errors import BrokerError

MAX_SHOWN = 256


def _bounded(value: str | None) -> str | None:
    return value[:MAX_SHOWN] if isinstance(value, str) else None


def record_refusal(engine: Engine, error: BrokerError, *, role: str, issuer: str | None, subject: str | None,
                   session_id: str | None = None, agent: str | None = None) -> None:
    event = AuditEvent(
        type="workload.refused",
        outcome=error.code,
        actor=f"workload:{role}",
        agent=AgentRef(agent, session_id, None),
        request=RequestRef(operation="authenticate", reason=error.code),
        detail={
            "workload": {"issuer": _bounded(issuer), "subject": _bounded(subject), "trust_rule": None,
                         "matched_rule": None, "role": role, "verified": False},
            "error": {"code": error.code, "message": error.message[:500]},
        },
    )
    with transaction(engine) as db:
        append(db, event)
