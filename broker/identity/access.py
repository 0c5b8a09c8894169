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

# The session column that names its manager, per kind of caller (admins manage all sessions,
# an agent only its own, by id).
_MANAGER_COLUMN = {"orchestrator": "created_by", "human": "human"}


def may_manage(caller: Caller, session: SessionRow) -> bool:
    if caller.kind == "admin":
        return True
    if caller.kind == "agent":
        return caller.session_id == session.id
    column = _MANAGER_COLUMN.get(caller.kind)
    return column is not None and getattr(session, column) == caller.name


def managed_by(caller: Caller, refusal: str) -> Any:
    """The sessions `caller` manages, as a WHERE clause on SessionRow (None: all of them, for
    admins). The query-side twin of `may_manage`; agents manage no set of sessions, so they
    get Forbidden(`refusal`)."""
    if caller.kind == "admin":
        return None
    column = _MANAGER_COLUMN.get(caller.kind)
    if column is None:
        raise Forbidden(refusal)
    return getattr(SessionRow, column) == caller.name
