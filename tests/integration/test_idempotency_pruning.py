"""The sweeper deletes expired Idempotency-Keys (broker/lifecycle/keys.py): the table follows the
recent traffic, not all of it (the soak found it growing by one row per request, forever), and a
key replayed within its lifetime still answers the same capability."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text

from broker.db import utcnow
from broker.lifecycle.keys import IN_PROGRESS_GRACE, prune_expired_keys
from broker.lifecycle.sweeper import sweep_once
from tests.support.brokers import Api

INSERT = text("INSERT INTO idempotency_keys (session_id, key, request_hash, state, response_status, sealed_response, "
              "created_at, expires_at) VALUES (:s, :k, 'h', :state, 201, 'sealed', :c, :e)")


def test_expired_keys_are_pruned_and_live_ones_kept(api: Api) -> None:
    session = api.new_session(scope=[{"resource": "jwt://payments-api", "access": ["read"]}])
    first = api.request(session, {"resource": "jwt://payments-api", "access": "read"}, **{"Idempotency-Key": "live"})
    assert first.status_code == 201, first.text
    now = utcnow()
    rows = {  # key -> (state, expires_at)
        "done-expired": ("done", now - timedelta(seconds=1)),
        "done-long-expired": ("done", now - timedelta(days=30)),
        "in-progress-just-expired": ("in_progress", now - timedelta(seconds=1)),
        "in-progress-abandoned": ("in_progress", now - IN_PROGRESS_GRACE - timedelta(seconds=1)),
        "done-fresh": ("done", now + timedelta(hours=1)),
    }
    with api.broker.engine.begin() as conn:
        for key, (state, expires) in rows.items():
            conn.execute(INSERT, {"s": session["session_id"], "k": key, "state": state,
                                  "c": expires - timedelta(days=1), "e": expires})
    removed = prune_expired_keys(api.broker, now, batch=2, force=True)  # batches smaller than the work
    assert removed == 3
    with api.broker.engine.connect() as conn:
        left = {r[0] for r in conn.execute(text("SELECT key FROM idempotency_keys"))}
    assert left == {"live", "in-progress-just-expired", "done-fresh"}
    # The live key still replays its capability, after a whole sweeper pass too.
    sweep_once(api.broker)
    again = api.request(session, {"resource": "jwt://payments-api", "access": "read"}, **{"Idempotency-Key": "live"})
    assert again.status_code == 201 and again.json()["capability_id"] == first.json()["capability_id"]
