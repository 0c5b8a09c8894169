"""A provider written from `broker/providers/base.py` alone plugs into every path of the broker.

`MemoryProvider` below is the whole provider: it subclasses `Provider`, overrides what its
backend has (search by capability id, a revocation lock key) and nothing else in the broker
knows about it. It mints through the API, is revoked through the API, is found by the
reconciler after an interrupted mint, and its revocations run one at a time per lock key.
"""

from __future__ import annotations

import secrets
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from broker.db import transaction, utcnow
from broker.lifecycle.reconciler import reconcile_at_start
from broker.models import Lease
from broker.policy import PolicyStore
from broker.providers.base import Grant, Minted, Provider, ProviderContext, RevokeTarget, fingerprint
from tests.support.brokers import STANDARD_TIERS, Api

POLICY = STANDARD_TIERS + """\
resources:
  - match: "mem://store/*"
    provider: memory
    access:
      read: {tier: read}
humans:
  alice@example.com:
    grants:
      - {resource: "mem://store/*", access: [read]}
agents:
  claude-code: {max_tier: review}
budgets: {max_issued_per_session: 100, max_active_per_session: 100}
"""
RESOURCE = "mem://store/ledger"


class MemoryProvider(Provider):
    """Credentials in a dict; revocations of one store serialised on the store's name."""

    name: ClassVar[str] = "memory"
    searchable: ClassVar[bool] = True

    def __init__(self) -> None:
        self.live: dict[str, str] = {}  # capability id -> token
        self.revoked: list[str] = []
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self.most_in_flight: dict[str, int] = {}

    @classmethod
    def from_context(cls, ctx: ProviderContext) -> MemoryProvider:
        return cls()

    def mint(self, grant: Grant) -> Minted:
        token = "mem_" + secrets.token_urlsafe(16)
        self.live[grant.capability_id] = token
        return Minted(
            credential={"type": "memory", "token": token},
            handle={"id": grant.capability_id},
            expires_at=datetime.now(UTC) + timedelta(seconds=grant.ttl_seconds),
            fingerprint=fingerprint(token),
        )

    def revoke(self, target: RevokeTarget) -> None:
        key = self.revocation_lock_key(target.resource)
        with self._lock:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
            self.most_in_flight[key] = max(self.most_in_flight.get(key, 0), self._in_flight[key])
        time.sleep(0.02)  # long enough that unserialised revocations would overlap
        with self._lock:
            self._in_flight[key] -= 1
            if self.live.pop(target.capability_id, None) is not None:
                self.revoked.append(target.capability_id)

    def find_by_capability(self, capability_id: str, resource: str) -> dict[str, Any] | None:
        return {"id": capability_id} if capability_id in self.live else None

    def revocation_lock_key(self, resource: str) -> str:
        return "memory:" + resource.split("://", 1)[1].split("/", 1)[0]


def plug_in(api: Api, tmp_path: Path) -> MemoryProvider:
    """What a deployment's entry point does, done by hand: the broker builds it, the policy names it."""
    policy_file = tmp_path / "memory-policy.yaml"
    policy_file.write_text(POLICY)
    provider = MemoryProvider.from_context(ProviderContext(settings=api.broker.settings))
    api.broker.providers[provider.name] = provider
    api.broker.policies = PolicyStore(policy_file)
    return provider


def test_mints_and_revokes_through_the_api(api: Api, tmp_path: Path) -> None:
    provider = plug_in(api, tmp_path)
    session = api.new_session(scope=[{"resource": "mem://store/*", "access": ["read"]}])
    r = api.request(session, {"resource": RESOURCE, "access": "read"})
    assert r.status_code == 201, r.text
    issued = r.json()
    assert issued["provider"] == "memory"
    assert provider.live[issued["capability_id"]] == issued["credential"]["token"]

    r = api.client.delete(f"/v1/capabilities/{issued['capability_id']}", headers=api.as_admin())
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "revoked"
    assert provider.revoked == [issued["capability_id"]]
    assert issued["capability_id"] not in provider.live


def test_an_interrupted_mint_is_found_by_the_reconciler(api: Api, tmp_path: Path) -> None:
    provider = plug_in(api, tmp_path)
    session = api.new_session(scope=[{"resource": "mem://store/*", "access": ["read"]}])
    # The broker died between minting and activating: the backend holds a credential, the
    # lease is `minting` without a handle, older than a claim.
    capability_id = "cap_" + secrets.token_hex(16)
    old = utcnow() - timedelta(seconds=api.broker.settings.claim_seconds + 5)
    with transaction(api.broker.engine) as db:
        db.add(Lease(id=capability_id, session_id=session["session_id"], resource=RESOURCE, access="read",
                     tier="read", provider="memory", status="minting", ttl_seconds=600, purpose="crash",
                     created_at=old, expires_at=old + timedelta(seconds=600)))
    provider.mint(Grant(capability_id=capability_id, session_id=session["session_id"], task_id="task-1",
                        human="alice@example.com", agent="claude-code", resource=RESOURCE, access="read",
                        tier="read", ttl_seconds=600))

    report = reconcile_at_start(api.broker)

    assert report.abandoned_mints == 1
    assert provider.revoked == [capability_id]
    with transaction(api.broker.engine) as db:
        lease = db.get(Lease, capability_id)
        assert lease is not None
        assert lease.status == "revoked"
        assert lease.handle == {"id": capability_id, "found_by_capability": True}


def test_revocations_under_one_lock_key_run_one_at_a_time(api: Api, tmp_path: Path) -> None:
    provider = plug_in(api, tmp_path)
    session = api.new_session(scope=[{"resource": "mem://store/*", "access": ["read"]}])
    ids = []
    for n in range(6):
        r = api.request(session, {"resource": f"mem://store/item-{n}", "access": "read"})
        assert r.status_code == 201, r.text
        ids.append(r.json()["capability_id"])

    r = api.client.post(f"/v1/sessions/{session['session_id']}/end", headers=api.as_orchestrator())
    assert r.status_code == 200, r.text
    assert r.json()["revoked"] == 6

    assert sorted(provider.revoked) == sorted(ids)
    assert provider.most_in_flight == {"memory:store": 1}
