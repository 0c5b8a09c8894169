"""The decision's session facts cost what changed, not what the session holds: the live count is
the session's counter after folding in the deltas that triggers on leases wrote (0009), and only
the escalation tiers are probed. Through mint, revoke, expiry, a failed mint, leases written
behind the broker's back and a migration over existing leases, they say exactly what reading
every live lease says."""

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
            assert bounded.active_count == live, (cap, bounded)
            assert bounded.active_tiers == exact.active_tiers & policy.escalation_tiers
            # The budget and escalation layers decide the same either way.
            if cap is not None:
                assert (bounded.active_count >= cap) == (exact.active_count >= cap)
        # Shadow and current together: the larger budget and both sets of escalation tiers.
        tight, loose = _policies(api)[1:3]
        both = session_facts(db, session, (tight, loose))
        assert both.active_count == live
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


def _deltas(api: Api, session_id: str) -> int:
    with api.broker.engine.begin() as conn:
        return int(conn.execute(text("SELECT count(*) FROM session_live_deltas WHERE session_id = :s"),
                                {"s": session_id}).scalar_one())


def test_the_count_folds_what_changed_and_stays_exact_for_leases_written_by_sql(api: Api) -> None:
    session = api.new_session()
    sid = session["session_id"]
    assert api.request(session, {"resource": "jwt://svc/a", "access": "read"}).status_code == 201
    # 300 live leases written straight into the table (as a restore or another tool would):
    # the trigger counts them all the same.
    with api.broker.engine.begin() as conn:
        conn.execute(text("INSERT INTO leases (id, session_id, resource, access, tier, provider, status, ttl_seconds, "
                          "purpose, created_at, expires_at, revoke_attempts) VALUES (:id, :s, 'jwt://svc/b', 'read', "
                          "'read', 'native', 'active', 600, 'bulk', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 0)"),
                     [{"id": f"cap_bulk{i:04d}", "s": sid} for i in range(300)])
    assert _deltas(api, sid) == 301  # the request's own lease and the 300
    _check(api, sid, 301, {"read"})
    assert _deltas(api, sid) == 0  # folded into sessions.live_count under the session lock
    with api.broker.engine.begin() as conn:
        conn.execute(text("UPDATE leases SET status = 'revoked' WHERE id LIKE 'cap_bulk%' AND id < 'cap_bulk0100'"))
        conn.execute(text("UPDATE leases SET status = 'active' WHERE id LIKE 'cap_bulk01%'"))  # no change: no delta
        conn.execute(text("DELETE FROM leases WHERE id = 'cap_bulk0299'"))
    assert _deltas(api, sid) == 101
    _check(api, sid, 200, {"read"})
    # Back from an ended status to a live one (never done by the broker) is counted too.
    with api.broker.engine.begin() as conn:
        conn.execute(text("UPDATE leases SET status = 'revoke_pending' WHERE id = 'cap_bulk0000'"))
    _check(api, sid, 201, {"read"})
    with api.broker.engine.begin() as conn:
        live = conn.execute(text("SELECT live_count FROM sessions WHERE id = :s"), {"s": sid}).scalar_one()
    assert live == 201


def test_the_budget_refuses_at_the_live_count_and_allows_again_after_a_revoke(api: Api) -> None:

    policy: CompiledPolicy = copy.copy(api.broker.policies.current)
    policy.max_active_per_session = 2
    api.broker.policies._current = policy  # this test's broker only
    session = api.new_session()
    agent = {"Authorization": f"Bearer {session['session_token']}"}
    first = api.request(session, {"resource": "jwt://svc/a", "access": "read"})
    second = api.request(session, {"resource": "jwt://svc/b", "access": "read"})
    assert first.status_code == second.status_code == 201
    third = api.request(session, {"resource": "jwt://svc/c", "access": "read"})
    assert third.status_code == 429, third.text
    assert third.json()["error"]["code"] == "budget-exceeded"
    assert api.client.delete(f"/v1/capabilities/{first.json()['capability_id']}", headers=agent).status_code == 200
    assert api.request(session, {"resource": "jwt://svc/c", "access": "read"}).status_code == 201
