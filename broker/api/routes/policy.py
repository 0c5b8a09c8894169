"""Dry-run decisions: the same evaluator as a real request, every layer's verdict shown."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from fastapi import APIRouter

from broker.api.deps import BrokerDep, HumanCaller
from broker.api.schemas.common import error_responses
from broker.api.schemas.sessions import ExplainRequest, Explanation
from broker.db import transaction, utcnow
from broker.errors import Forbidden, InvalidRequest, NotFound
from broker.identity.access import may_manage
from broker.identity.callers import Caller
from broker.leases.facts import bounds_lookup, session_facts
from broker.leases.service import decide
from broker.models import SessionRow
from broker.policy import RequestFacts, ScopeEntry, SessionFacts, evaluate_with_shadow
from broker.policy.resources import canonical_pattern, canonical_resource
from broker.principals import canonical_human, same_principal
from broker.times import rfc3339

router = APIRouter(prefix="/v1/policy", tags=["policy"])


@router.post("/explain", response_model=Explanation, responses=error_responses(400, 401, 403, 404, 422))
def explain(body: ExplainRequest, broker: BrokerDep, caller: HumanCaller) -> Explanation:
    now = utcnow()
    policy = broker.policies.current
    resource = _canonical(canonical_resource, body.resource)
    if body.session_id:
        with transaction(broker.engine) as db:
            session = db.get(SessionRow, body.session_id)
            if session is None or not may_manage(caller, session):
                raise NotFound("no such session", code="session-not-found")
            facts = session_facts(db, session)
            live = broker.permissions.consult(policy, facts.human, resource, body.access, caller=caller.principal)
            # The request path's own decision, grants included (looked at, never used), so explain
            # tells the same story a real request would meet.
            decision, shadow, grant = decide(broker, db, facts, resource, body.access, body.ttl_seconds, now,
                                             approved=False, live=live, lock_grant=False)
            used = None if grant is None else {
                "grant_id": grant.id, "granted_by": grant.granted_by, "uses_left": grant.uses_left,
                "expires_at": rfc3339(grant.expires_at)}
        return Explanation(decision=decision.to_dict(), shadow=shadow.to_dict() if shadow else None, grant=used)
    if not (body.human and body.agent and body.scope):
        raise InvalidRequest("give session_id, or human, agent and scope for a hypothetical session",
                             code="explain-needs-session")
    if caller.kind != "admin" and not _is_self(caller, body.human):
        # Explain asks the live source for real: for another person it would tell the caller
        # that person's backend role (and spend the source's quota on their behalf).
        raise Forbidden("explaining another human's access is for admins; explain your own "
                        "(human: you) or a session you manage (session_id)", code="explain-other-human-forbidden")
    facts = SessionFacts(
        session_id="(hypothetical)", human=canonical_human(body.human), agent=body.agent,
        task_id=body.task_id or "(hypothetical)",
        scope=tuple(ScopeEntry(_canonical(canonical_pattern, s.resource), tuple(s.access)) for s in body.scope),
        status="active",
        expires_at=now + timedelta(seconds=body.session_ttl_seconds),
        # A person explaining their own access: their IdP groups count, as in their sessions.
        human_groups=caller.groups if _is_self(caller, body.human) else frozenset(),
    )
    # The live layer is asked for real (through the cache), so explain shows what a request would meet.
    # The caller pays for a backend call out of its own budget (429 live-check-budget-exceeded).
    live = broker.permissions.consult(policy, facts.human, resource, body.access, caller=caller.principal)
    decision, shadow = evaluate_with_shadow(
        policy, broker.policies.shadow, facts,
        RequestFacts(resource=resource, access=body.access, ttl_seconds=body.ttl_seconds, now=now, live=live),
        bounds_lookup(broker),
    )
    return Explanation(decision=decision.to_dict(), shadow=shadow.to_dict() if shadow else None)


def _is_self(caller: Caller, human: str) -> bool:
    """Whether a person explains their own access (a name with no canonical form is nobody's own)."""
    return caller.kind == "human" and same_principal(human, caller.name)


def _canonical(parse: Callable[[str], str], text: str) -> str:
    """The canonical form, as a real request would see it; a malformed one is left for the
    evaluator, whose resource layer names the problem in its verdict."""
    try:
        return parse(text)
    except InvalidRequest:
        return text
