"""Who may touch what: which sessions (and so which leases and audit records) a caller manages.

Every check of "may this caller see or change this session" goes through here, in two
forms that must agree: `may_manage` for one session in hand, `managed_by` as a WHERE clause
for listings. An absent session and one the caller may not see get the same answer
(404) from the callers of these functions, so ids are not an oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlmodel import and_, func, or_

from broker.errors import Forbidden
from broker.identity.callers import Caller
from broker.models import SessionRow
from broker.principals import canonical_human, same_principal


def human_is(principal: str) -> Any:
    """WHERE the session's human is `principal` in the canonical form (broker.principals).

    Sessions store the canonical form; rows from before that may differ in ASCII case only, so a
    row also matches when its lower- *and* upper-cased forms equal the canonical one's: a
    non-ASCII letter that case-maps to ASCII one way (KELVIN SIGN lowers to "k", LONG S uppers to
    "S") keeps its own form the other way, so no such row ever matches an ASCII principal.
    """
    name = canonical_human(principal)
    return or_(SessionRow.human == name,
               and_(func.lower(SessionRow.human) == name, func.upper(SessionRow.human) == name.upper()))


# Per kind of caller, side by side: does this session belong to the caller, and the same as a
# WHERE clause (None: every session). Agents are not here: an agent manages its own session
# only, by id, and no set of sessions.
_MANAGES: dict[str, tuple[Callable[[Caller, SessionRow], bool], Callable[[Caller], Any]]] = {
    "admin": (lambda caller, session: True, lambda caller: None),
    "orchestrator": (lambda caller, session: session.created_by == caller.name,
                     lambda caller: SessionRow.created_by == caller.name),
    "human": (lambda caller, session: same_principal(session.human, caller.name),
              lambda caller: human_is(caller.name)),
}


def may_manage(caller: Caller, session: SessionRow) -> bool:
    if caller.kind == "agent":
        return caller.session_id == session.id
    rule = _MANAGES.get(caller.kind)
    return rule is not None and rule[0](caller, session)


def managed_by(caller: Caller, refusal: str) -> Any:
    """The sessions `caller` manages, as a WHERE clause on SessionRow (None: all of them, for
    admins). The query-side twin of `may_manage`; agents get Forbidden(`refusal`)."""
    rule = _MANAGES.get(caller.kind)
    if rule is None:
        raise Forbidden(refusal)
    return rule[1](caller)
