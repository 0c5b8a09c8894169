"""The decision's session facts cost what the policy asks, not what the session holds: the live
count is counted only up to the budget, and only the escalation tiers are probed. Through mint,
revoke, expiry and a failed mint they say exactly what reading every live lease says."""

from __future__ import annotations

import copy
import time

from sqlalchemy import text

from broker.db import transaction
from broker.leases.facts import session_facts
from broker.lifecycle.sweeper import sweep_once
from broker.models import SessionRow
from broker.policy.compiled import CompiledPolicy
from tests.support.brokers import Api


def _policies(api: Api) -> list[CompiledPolicy]:
    current = api.broker.policies.current
    tight = copy.copy(current)
    tight.max_active_per_session = 2
    tight.escalation_tiers = frozenset({"read", "merge_deploy"})
    loose = copy.copy(current)
    loose.max_active_per_session = 1000
    loose.escalation_tiers = frozenset({"write"})
    unbudgeted = copy.copy(current)
    unbudgeted.max_active_per_session = None
    return [current, tight, loose, unbudgeted]


def _check(api: Api, session_id: str, live: int, tiers: set[str]) -> None:
    with transaction(api.broker.engine) as db:
        session = db.get(SessionRow, session_id)
        assert session is not None
        exact = session_facts(db, session)
        assert exact.active_count == live and exact.active_tiers == tiers
        for policy in _policies(api):
            bounded = session_facts(db, session, (policy, None))
            cap = policy.max_active_per_session
            assert bounded.active_count == (0 if cap is None else min(live, cap)), (cap, bounded)
            assert bounded.active_tiers == exact.active_tiers & policy.escalation_tiers
            # The budget and escalation layers decide the same either way.
            if cap is not None:
                assert (bounded.active_count >= cap) == (exact.active_count >= cap)
        # Shadow and current together: the larger budget and both sets of escalation tiers.
        tight, loose = _policies(api)[1:3]
        both = session_facts(db, session, (tight, loose))
        assert both.active_count == min(live, 1000)
        assert both.active_tiers == exact.active_tiers & (tight.escalation_tiers | loose.escalation_tiers)


def test_bounded_facts_stay_exact_through_mint_revoke_expiry_and_failure(api: Api) -> None:
    session = api.new_session()
    sid = session["session_id"]
    _check(api, sid, 0, set())
    short = api.request(session, {"resource": "jwt://svc/a", "access": "read", "ttl_seconds": 1}).json()
    caps = [api.request(session, {"resource": f"jwt://svc/k{i}", "access": "read", "ttl_seconds": 600}).json()
            for i in range(3)]
    write = api.request(session, {"resource": "jwt://payments-api", "access": "write", "ttl_seconds": 600}).json()
    assert all("capability_id" in c for c in (short, *caps, write))
    _check(api, sid, 5, {"read", "write"})

    agent = {"Authorization": f"Bearer {session['session_token']}"}
    assert api.client.delete(f"/v1/capabilities/{write['capability_id']}", headers=agent).status_code == 200
    _check(api, sid, 4, {"read"})  # revoked

    time.sleep(1.2)
    assert sweep_once(api.broker).revoked == [short["capability_id"]]
    _check(api, sid, 3, {"read"})  # expired

    # A mint in flight is live; once it fails it is not.
    with api.broker.engine.begin() as conn:
        conn.execute(text("UPDATE leases SET status = 'minting', tier = 'merge_deploy' WHERE id = :id"),
                     {"id": caps[0]["capability_id"]})
    _check(api, sid, 3, {"read", "merge_deploy"})
    with api.broker.engine.begin() as conn:
        conn.execute(text("UPDATE leases SET status = 'failed' WHERE id = :id"), {"id": caps[0]["capability_id"]})
    _check(api, sid, 2, {"read"})

    for c in caps[1:]:
        assert api.client.delete(f"/v1/capabilities/{c['capability_id']}", headers=agent).status_code == 200
    _check(api, sid, 0, set())
