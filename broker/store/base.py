"""The storage seam: one operation per decision, one implementation per database.

The request path asks the store for what it cannot decide alone. A native capability, decided
against the session's unchanging facts (who, what task, which scope, until when), is written by
one call, `issue`, that re-checks under the session's row lock what could have changed (the
session ended, a budget filled, an escalation tier went live, the idempotency key was used) and
writes nothing if it did: the caller then takes the full path, which records the refusal. On
PostgreSQL the call is one round trip (migration 0013's functions, `postgres.py`); on SQLite the
same steps in one transaction (`sqlite.py`). A remote backend's capability is two calls around
the backend's: `reserve` (the `minting` lease, committed first: crash-safe) and `activate`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from broker.audit.service import RecordTemplate
from broker.models import NewLease, SessionSnapshot

# What `issue` or `reserve` answered: written, or why nothing was (the full path then decides again).
IssueResult = Literal["issued", "reserved", "no-session", "session-ended", "key-exists", "budget-exceeded",
                      "escalation"]
# What `activate` answered: `not-minting` when the lease was torn down while it was being minted.
ActivateResult = Literal["activated", "not-minting"]


@dataclass(frozen=True)
class Reservation:
    """A new lease and what must still hold, under the session's row lock, to write it."""

    lease: NewLease
    key_row: dict[str, Any] | None  # the idempotency key's row (column -> value)
    max_issued: int | None
    max_active: int | None
    # The policy's escalation tiers when the lease's tier is one of them (a live lease of any of
    # them would have asked for approval); empty otherwise.
    escalation: tuple[str, ...]


@dataclass(frozen=True)
class Issue:
    """A capability minted locally: its reservation (the lease already active, the key with its
    sealed outcome) and its `capability.minted` record, written at once."""

    reservation: Reservation
    audit: RecordTemplate


@dataclass(frozen=True)
class HeldKey:
    """An idempotency key held `in_progress` by a reservation, and the outcome it now stores."""

    session_id: str
    key: str
    status: int
    sealed: str


@dataclass(frozen=True)
class Activation:
    """A remote mint's lease, now holding what the backend minted, with its key and record."""

    lease: NewLease
    key: HeldKey | None
    audit: RecordTemplate


class Store(Protocol):
    async def session(self, session_id: str) -> SessionSnapshot | None:
        """The session's row as it is now, unlocked: the caller keeps only its unchanging facts."""

    async def issue(self, issue: Issue) -> IssueResult:
        """Reserve and record in one transaction, if the locked session row still allows it."""

    async def reserve(self, reservation: Reservation) -> IssueResult:
        """Write the `minting` lease (and the held key) in one transaction, if the locked session
        row still allows it: committed before the backend is called."""

    async def activate(self, activation: Activation) -> ActivateResult:
        """The lease active (if still `minting`), the key's outcome, the record: one transaction."""

    async def ping(self) -> None:
        """Raise if the request path cannot reach its database now (readiness asks this)."""

    async def close(self) -> None: ...


def refusal_of(*, status: str, key_taken: bool, issued: int, live: int, max_issued: int | None,
               max_active: int | None, escalated: bool, held: bool = False) -> IssueResult | None:
    """The same checks, in the same order, as migration 0013's function: for the stores that
    make them in Python. `held`: suspended by the deviation tripwire or silent past its idle
    timeout, which the full path decides like an ended session's request."""
    if status != "active" or held:
        return "session-ended"
    if key_taken:
        return "key-exists"
    if max_issued is not None and issued >= max_issued:
        return "budget-exceeded"
    if max_active is not None and live >= max_active:
        return "budget-exceeded"
    if escalated:
        return "escalation"
    return None


class SessionCache:
    """Sessions as first read, by id, for their unchanging facts (who, the task, the scope, the
    end); bounded, least recently used out first. Status and counters in a cached snapshot are
    stale by design: `Store.issue` reads those under the row lock."""

    def __init__(self, size: int = 16_384) -> None:
        self._size = size
        self._sessions: OrderedDict[str, SessionSnapshot] = OrderedDict()

    async def get(self, store: Store, session_id: str) -> SessionSnapshot | None:
        session = self._sessions.get(session_id)
        if session is not None:
            self._sessions.move_to_end(session_id)
            return session
        session = await store.session(session_id)
        if session is not None:
            self._sessions[session_id] = session
            if len(self._sessions) > self._size:
                self._sessions.popitem(last=False)
        return session
