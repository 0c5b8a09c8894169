"""Who may touch what: which sessions (and so which leases and audit records) a caller manages.

Every check of "may this caller see or change this session" goes through here, in two
forms that must agree: `may_manage` for one session in hand, `managed_by` as a WHERE clause
for listings. An absent session and one the caller may not see get the same answer
(404) from the callers of these functions, so ids are not an oracle.
"""

from __future__ import annotations

from typing import Any

from broker.errors import Forbidden
from broker.identity.callers import Caller
from broker.models import SessionRow


def may_manage(caller: Caller, session: SessionRow) -> bool:
    if caller.kind == "admin":
        return True
    if caller.kind == "orchestrator":
        return session.created_by == caller.name
    if caller.kind == "human":
        return session.human == caller.name
    if caller.kind == "agent":
        return caller.session_id == session.id
    return False


def managed_by(caller: Caller, refusal: str) -> Any:
    """The sessions `caller` manages, as a WHERE clause on SessionRow (None: all of them, for
    admins). The query-side twin of `may_manage`; agents manage no set of sessions, so they
    get Forbidden(`refusal`)."""
    if caller.kind == "admin":
        return None
    if caller.kind == "orchestrator":
        return SessionRow.created_by == caller.name
    if caller.kind == "human":
        return SessionRow.human == caller.name
    raise Forbidden(refusal)

