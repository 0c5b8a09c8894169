"""Reading and verifying the audit chain."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query

from broker.api.deps import AdminCaller, AnyCaller, BrokerDep
from broker.api.schemas import AuditPage, AuditVerification, error_responses
from broker.audit import service as audit
from broker.db import transaction
from broker.errors import Forbidden, NotFound
from broker.identity.access import may_manage
from broker.models import SessionRow

router = APIRouter(prefix="/v1/audit", tags=["audit"])
ERRORS = error_responses(401, 403, 404, 422)


@router.get("", response_model=AuditPage, responses=ERRORS)
def read_audit(
    broker: BrokerDep, caller: AnyCaller,
    session_id: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[int, Query(ge=0, description="return records with seq greater than this")] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 100,
    type: Annotated[list[str] | None, Query()] = None,
) -> AuditPage:
    with transaction(broker.engine) as db:
        if caller.kind != "admin":
            # Humans (and orchestrators) read their own sessions' records only.
            if caller.kind == "agent" or not session_id:
                raise Forbidden("only admins read the whole log; give a session_id you manage")
            session = db.get(SessionRow, session_id)
            if session is None or not may_manage(caller, session):
                raise NotFound("no such session", code="session-not-found")
        rows = audit.query(db, session_id=session_id, since_seq=since, limit=limit, types=type)
        records = [{**json.loads(r.record), "prev_hash": r.prev_hash, "hash": r.hash} for r in rows]
    return AuditPage(records=records, next_since=records[-1]["seq"] if records else since)


@router.get("/verify", response_model=AuditVerification, responses=ERRORS)
def verify_audit(broker: BrokerDep, caller: AdminCaller) -> AuditVerification:
    with transaction(broker.engine) as db:
        return AuditVerification.model_validate(audit.verify(db).to_dict())
