"""Reading and verifying the audit chain."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import StringConstraints

from broker.api.deps import AdminCaller, AnyCaller, BrokerDep
from broker.api.schemas.audit import (
    AuditCheckpoint,
    AuditConsistency,
    AuditCosignatureOut,
    AuditPage,
    AuditVerification,
    AuditWitnessStatus,
)
from broker.api.schemas.common import error_responses
from broker.audit import checkpoint as checkpoints
from broker.audit import service as audit
from broker.audit import verification
from broker.audit import witness as witnesses
from broker.audit.linker import latest_checkpoint
from broker.audit.merkle import consistency_proof
from broker.db import transaction
from broker.errors import Forbidden, InvalidRequest, NotFound
from broker.identity.access import may_manage
from broker.ids import SESSION_ID_PATTERN
from broker.models import SessionRow

router = APIRouter(prefix="/v1/audit", tags=["audit"])
ERRORS = error_responses(401, 403, 404, 422)
MAX_SEQ = 2**31 - 1  # the seq column is a 32-bit INTEGER: larger would overflow it, not find nothing


@router.get("", response_model=AuditPage, responses=ERRORS)
def read_audit(
    broker: BrokerDep, caller: AnyCaller,
    session_id: Annotated[str | None, Query(pattern=SESSION_ID_PATTERN)] = None,
    since: Annotated[int, Query(ge=0, le=MAX_SEQ, description="return records with seq greater than this")] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 100,
    newest: Annotated[bool, Query(description="the newest `limit` records (after `since`), oldest first: "
                                              "a tail in one request")] = False,
    type: Annotated[list[Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]] | None,
                    Query(max_length=32)] = None,
) -> Response:
    """An AuditPage, spliced from the stored records (below): `response_model` documents it."""
    with transaction(broker.engine) as db:
        if caller.kind != "admin" and (caller.kind == "agent" or not session_id):
            # Humans (and orchestrators) read their own sessions' records only.
            raise Forbidden("only admins read the whole log; give a session_id you manage")
        if session_id:  # an unknown session is a 404 for everyone, never an empty page
            session = db.get(SessionRow, session_id)
            if session is None or (caller.kind != "admin" and not may_manage(caller, session)):
                raise NotFound("no such session", code="session-not-found")
        rows = audit.query(db, session_id=session_id, since_seq=since, limit=limit, types=type, newest=newest)
        # The stored records are spliced in as written, never parsed and re-encoded: no record
        # the log ever accepted (however deep) can make this answer fail.
        records = [r.record[:-1] + f',"prev_hash":"{r.prev_hash}","hash":"{r.hash}"}}' for r in rows]
        next_since = rows[-1].seq if rows else since
    body = '{"records":[' + ",".join(records) + f'],"next_since":{next_since}}}'
    return Response(body.encode(), media_type="application/json")


@router.get("/verify", response_model=AuditVerification, responses=ERRORS)
def verify_audit(broker: BrokerDep, caller: AdminCaller) -> AuditVerification:
    keys = {k.kid: k.public for k in broker.keyring.published()}
    with transaction(broker.engine) as db:
        return AuditVerification.model_validate(verification.verify(db, keys).to_dict())


@router.get("/checkpoint", response_model=AuditCheckpoint, responses=ERRORS)
def read_checkpoint(broker: BrokerDep, caller: AnyCaller) -> AuditCheckpoint:
    """The newest signed checkpoint of the audit tree (the linker signs one while the log grows)."""
    if caller.kind == "agent":
        raise Forbidden("agents do not read audit checkpoints")
    cp = latest_checkpoint(broker)
    if cp is None:
        raise NotFound("no checkpoint has been signed yet", code="checkpoint-not-found")
    keys = {k.kid: k.public for k in broker.keyring.published()}
    note, rows = witnesses.cosigned_note(broker, cp)
    extra: dict[str, Any] = {
        "note": note,
        "cosignatures": [AuditCosignatureOut(witness=r.witness, timestamp=r.timestamp) for r in rows],
        "witnesses": [AuditWitnessStatus.model_validate(s, from_attributes=True) for s in witnesses.states(broker)],
    }
    try:
        parsed = checkpoints.parse(cp.note, keys)
    except checkpoints.CheckpointError:  # signed by a key since retired: still the newest
        return AuditCheckpoint(origin=cp.note.split("\n", 1)[0], tree_size=cp.tree_size, root_hash=cp.root_hash,
                               timestamp=cp.timestamp, key_name=cp.note.split("\n\n", 1)[-1].split(" ")[1],
                               **extra)
    return AuditCheckpoint.model_validate({**parsed.to_dict(), **extra,
                                           "verifier_key": checkpoints.vkey(parsed.key_name, keys[parsed.key_name])})


@router.get("/consistency", response_model=AuditConsistency, responses=error_responses(400, 401, 403, 404, 422))
def read_consistency(
    broker: BrokerDep, caller: AdminCaller,
    first: Annotated[int, Query(ge=1, le=MAX_SEQ)],
    second: Annotated[int, Query(ge=1, le=MAX_SEQ)],
) -> AuditConsistency:
    """Proof that the tree of size `second` extends the tree of size `first`."""
    if first > second:
        raise InvalidRequest("first must not be larger than second", code="invalid-tree-size")
    with transaction(broker.engine) as db:
        try:
            leaves = verification.leaf_hashes(db, second)
        except LookupError as exc:
            raise NotFound(str(exc), code="tree-size-not-found") from exc
    return AuditConsistency(first=first, second=second, proof=[h.hex() for h in consistency_proof(first, leaves)])
