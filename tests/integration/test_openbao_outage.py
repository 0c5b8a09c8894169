"""OpenBao sealed, then stopped, while agents mint and revoke Vault capabilities: the broker
answers 503 provider-unavailable with Retry-After (never 500), each Idempotency-Key gets one
capability, nothing revoked is reported revoked before OpenBao confirms it, and once OpenBao is
back every revoked capability's token is refused by OpenBao and the audit verifies.

A revocation that a seal or a shutdown cuts off can leave its token *tainted* at OpenBao
(`num_uses: -1`, revocation pending): refused on every use, its accessor still listed until the
token's own expiry. The broker may call such a capability revoked only by asking OpenBao, and its
receipt says so; the test holds every token it was handed and proves each revoked one refused."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import hvac
import hvac.exceptions as hx
import pytest
from sqlalchemy import text

from broker.audit.linker import link_all
from broker.audit.verification import verify
from broker.db import transaction
from tests.support.brokers import STANDARD_TIERS, BrokerSecrets, LiveServer, build_broker
from tests.support.openbao import OpenBaoServer, configure_vault

pytestmark = pytest.mark.slow

VAULT = "vault://secret/data/allowed"
POLICY = STANDARD_TIERS + """\
resources:
  - match: "vault://secret/data/allowed"
    provider: vault
    access:
      read: {tier: read, policies: [kv-allowed]}
humans:
  alice@example.com:
    grants:
      - {resource: "vault://secret/data/allowed", access: [read]}
agents:
  claude-code: {max_tier: review}
budgets: {max_issued_per_session: 100000, max_active_per_session: 100000}
"""


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def wait_until(predicate: Callable[[], bool], within: float, what: str) -> None:
    """A bound on a wait on a busy machine, not a timing assertion."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        time.sleep(0.1)


def accessor_state(root: hvac.Client, accessor: str) -> str:
    """"gone", "tainted" (OpenBao has its revocation pending: refused, removed at expiry) or "live"."""
    try:
        data = root.auth.token.lookup_accessor(accessor)["data"]
    except (hx.InvalidRequest, hx.Forbidden):
        return "gone"  # "invalid accessor": revoked or expired
    return "tainted" if data["num_uses"] < 0 else "live"


def token_refused(bao: OpenBaoServer, token: str) -> bool:
    """The credential itself, used as its holder would: OpenBao refuses it."""
    try:
        bao.client(token).auth.token.lookup_self()
        return False
    except hx.Forbidden:
        return True


def test_openbao_sealed_and_stopped_under_mints_and_revocations(  # noqa: C901  # one outage story, phase by phase
        openbao_restartable: OpenBaoServer, postgres_url: str, tmp_path: Path) -> None:
    bao = openbao_restartable
    setup = configure_vault(bao)
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, postgres_url, secrets_, POLICY, vault_addr=bao.addr,
                          vault_token=setup.broker_token, vault_token_role=setup.token_role,
                          provider_timeout_seconds=3.0, sweep_interval_seconds=0.2)
    lock = threading.Lock()
    statuses: Counter[tuple[str, int]] = Counter()
    unexpected: list[str] = []
    answers: dict[str, set[str]] = defaultdict(set)
    revoked: dict[str, str] = {}  # capability id -> the status its DELETE answered
    tokens: dict[str, str] = {}  # capability id -> the Vault token it was answered with
    stop = threading.Event()

    with LiveServer(broker, sweeper=True) as server, httpx.Client(base_url=server.base_url, timeout=30) as setup_client:
        r = setup_client.post("/v1/sessions", headers=bearer(secrets_.orchestrator_key), json={
            "human": "alice@example.com", "agent": "claude-code", "task_id": "bao-outage", "ttl_seconds": 3600,
            "scope": [{"resource": VAULT, "access": ["read"]}]})
        assert r.status_code == 201, r.text
        session = r.json()

        def note(what: str, r: httpx.Response, ok: tuple[int, ...]) -> None:
            with lock:
                statuses[(what, r.status_code)] += 1
                if r.status_code in ok:
                    return
                if r.status_code != 503 or r.json()["error"]["code"] != "provider-unavailable" \
                        or "Retry-After" not in r.headers:
                    unexpected.append(f"{what} {r.status_code} {r.text[:300]}")

        def agent(n: int) -> None:
            with httpx.Client(base_url=server.base_url, timeout=30) as client:
                while not stop.is_set():
                    key = f"bao-{n}-{uuid.uuid4().hex}"
                    deadline = time.monotonic() + 120
                    cap = None
                    while cap is None and time.monotonic() < deadline:
                        r = client.post("/v1/capabilities", json={"resource": VAULT, "access": "read", "ttl_seconds": 600,
                                                                  "purpose": "bao outage"},
                                        headers={**bearer(session["session_token"]), "Idempotency-Key": key})
                        note("mint", r, (201,))
                        if r.status_code == 201:
                            cap = r.json()["capability_id"]
                            with lock:
                                answers[key].add(cap)
                                tokens[cap] = r.json()["credential"]["token"]
                        elif r.status_code != 503:
                            return
                        else:
                            time.sleep(0.2)
                    if cap is None:
                        with lock:
                            unexpected.append(f"key {key} never answered")
                        return
                    r = client.delete(f"/v1/capabilities/{cap}", headers=bearer(session["session_token"]))
                    note("revoke", r, (200,))
                    if r.status_code == 200:
                        with lock:
                            revoked[cap] = r.json()["status"]

        # Held capabilities, revoked while OpenBao is away: each revocation is answered (200,
        # revoke_pending, or 503) and finished by the sweeper once OpenBao is back.
        held = []
        for _ in range(6):
            r = setup_client.post("/v1/capabilities", json={"resource": VAULT, "access": "read", "ttl_seconds": 600,
                                                            "purpose": "held"}, headers=bearer(session["session_token"]))
            assert r.status_code == 201, r.text
            held.append(r.json()["capability_id"])
            tokens[held[-1]] = r.json()["credential"]["token"]
            answers[f"held-{len(held)}"].add(held[-1])

        def revoke_held(n: int) -> None:
            for cap in [held.pop() for _ in range(n)]:
                r = setup_client.delete(f"/v1/capabilities/{cap}", headers=bearer(session["session_token"]))
                note("revoke-held", r, (200,))
                if r.status_code == 200:
                    revoked[cap] = r.json()["status"]
                else:  # 503: nothing was done; asked again once OpenBao is back
                    held.insert(0, cap)

        agents = [threading.Thread(target=agent, args=(n,)) for n in range(4)]
        for t in agents:
            t.start()
        try:
            def minted() -> int:
                with lock:
                    return statuses[("mint", 201)]

            wait_until(lambda: minted() >= 10, 60, "mints before the outage")
            bao.seal()  # sealed: OpenBao answers 503 to everything
            revoke_held(3)
            time.sleep(1.5)
            bao.unseal()
            wait_until(lambda: minted() >= 20, 60, "mints after the unseal")
            bao.stop()  # gone: connections refused
            revoke_held(3)
            time.sleep(1.5)
            bao.start()
            wait_until(lambda: minted() >= 30, 60, "mints after the restart")
        finally:
            stop.set()
            for t in agents:
                t.join(150)
        assert not any(t.is_alive() for t in agents)
        revoke_held(len(held))  # any the outage answered 503: OpenBao is back now
        assert not unexpected, unexpected[:10]
        assert {status for _, status in statuses} <= {200, 201, 503}, statuses
        outage_answers = sum(n for (_, status), n in statuses.items() if status == 503)
        revoke_pending = [cap for cap, status in revoked.items() if status == "revoke_pending"]
        # The outages were seen: as 503s on mints, or as revocations left pending for the sweeper.
        assert outage_answers + len(revoke_pending) > 0, statuses
        assert all(len(ids) == 1 for ids in answers.values()), answers
        answered = {next(iter(ids)) for ids in answers.values()}
        assert set(revoked) <= answered and set(revoked.values()) <= {"revoked", "revoke_pending"}, revoked

        engine = broker.engine
        with engine.connect() as conn:
            rows = {row.id: row for row in conn.execute(text("SELECT id, status FROM leases")).all()}
        # Every mint that was answered has its lease; no lease the agents were not told of is live.
        assert answered <= set(rows)
        assert {i for i, row in rows.items() if row.status == "active"} <= answered

        # OpenBao back: the sweeper finishes every pending revocation, and OpenBao confirms it.
        def settled() -> bool:
            with engine.connect() as conn:
                return not conn.execute(text("SELECT count(*) FROM leases WHERE status = 'revoke_pending'")).scalar_one()

        wait_until(settled, 120, "every pending revocation retried to the end")
        root = bao.client()
        with engine.connect() as conn:
            handles = dict(conn.execute(text("SELECT id, status FROM leases")).all())
        assert all(handles[cap] == "revoked" for cap in revoked), {c: handles[c] for c in revoked}
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            for cap in revoked:
                view = client.get(f"/v1/capabilities/{cap}", headers=bearer(session["session_token"]))
                assert view.status_code == 200 and view.json()["status"] == "revoked"
        # The guarantee itself: every revoked capability's token, used as its holder would, is refused.
        usable = [cap for cap in revoked if not token_refused(bao, tokens[cap])]
        assert not usable, usable
        # And OpenBao's own record agrees: the accessor is gone, or its token's revocation is
        # pending there (a cut-off revocation), which the capability's receipt then says.
        states = {cap: accessor_state(root, accessor) for cap, accessor in _accessors(engine, set(revoked)).items()}
        assert "live" not in states.values(), states
        tainted = {cap for cap, state in states.items() if state == "tainted"}
        said = _revoked_receipts(engine, tainted)
        assert all("revocation is pending" in said[cap] for cap in tainted), said

        link_all(broker, checkpoint=False, wait=30)
        with transaction(engine) as db:
            result = verify(db)
        assert result.ok and result.unlinked == 0, result
        print(f"openbao outage: {dict(statuses)}, {len(answered)} minted, {len(revoke_pending)} revocations pending, "
              f"{len(tainted)} tokens left tainted by a cut-off revocation")


def _accessors(engine: Any, ids: set[str]) -> dict[str, str]:
    """capability id -> its Vault token accessor (the lease's stored handle)."""
    from broker.models import Lease

    with transaction(engine) as db:
        out = {}
        for cap in ids:
            lease = db.get(Lease, cap)
            assert lease is not None and lease.handle, cap
            out[cap] = lease.handle["accessor"]
        return out


def _revoked_receipts(engine: Any, ids: set[str]) -> dict[str, str]:
    """capability id -> what its `capability.revoked` record's receipt says the backend confirmed."""
    out: dict[str, str] = {}
    with engine.connect() as conn:
        for cap in ids:
            records = conn.execute(text("SELECT record FROM audit_records WHERE type = 'capability.revoked' "
                                        "AND record LIKE :cap"), {"cap": f"%{cap}%"}).scalars().all()
            assert len(records) == 1, (cap, records)
            out[cap] = json.loads(records[0])["detail"]["receipt"]["detail"]
    return out

