"""Two identities never become one: IdP accounts whose addresses only look like kate@example.com
(or turn into it under Unicode case mapping, NFKC or strip()) are refused, and nothing they do
is approved, granted or minted. Real OIDC provider, real broker over HTTP.

Tokens come from the provider itself (device flow, for the accounts in tests/support/oidc.py)
and, for the whole corpus, are signed with the provider's own key (the fixture makes it), so the
broker sees exactly what an IdP with such accounts would send.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine
from sqlmodel import Session, select

from broker.identity.access import human_is
from broker.migrate import upgrade
from broker.models import SessionRow
from tests.integration.test_oidc_identity import _claims, error_code
from tests.support.brokers import PAYMENTS_API, STANDARD_TIERS, BrokerSecrets, LiveServer, build_broker
from tests.support.oidc import OidcProvider
from tests.unit.identity.test_principals import LOOKALIKES_OF_KATE

KATE = "kate@example.com"
ALICE = "alice@example.com"
# Only kate approves deploys, by name: a look-alike of kate is the one way in for the attacker.
POLICY = STANDARD_TIERS.replace("approvers: [group:maintainers]", f'approvers: ["user:{KATE}"]') + \
    "resources:\n" + PAYMENTS_API + f"""\
humans:
  {ALICE}:
    grants: [{{resource: "jwt://payments-api", access: [read, deploy]}}]
  Kate@Example.com:
    grants: [{{resource: "jwt://payments-api", access: [read, deploy]}}]
agents:
  claude-code: {{max_tier: merge_deploy}}
"""
DEPLOY = {"resource": "jwt://payments-api", "access": "deploy", "ttl_seconds": 300, "purpose": "release 1.4.2",
          "parameters": {"env": "prod"}}
# Accounts of the test IdP whose email only looks like kate's.
LOOKALIKE_LOGINS = ["kelvin-kate", "fullwidth-kate", "cyrillic-kate", "nbsp-kate", "zwsp-kate", "bidi-kate"]
CORPUS = [name for name in LOOKALIKES_OF_KATE if name]  # "" is "no claim", refused too, another code
SAME_AS_KATE = ["kate@example.com", "KATE@EXAMPLE.COM", "Kate@Example.Com"]


class Broker:
    def __init__(self, client: httpx.Client, secrets_: BrokerSecrets) -> None:
        self.client, self.secrets = client, secrets_

    def as_(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.as_(self.secrets.admin_token)

    @property
    def orchestrator(self) -> dict[str, str]:
        return self.as_(self.secrets.orchestrator_key)

    def records(self, session_id: str) -> list[dict[str, Any]]:
        r = self.client.get("/v1/audit", params={"session_id": session_id, "limit": 1000}, headers=self.admin)
        assert r.status_code == 200, r.text
        return list(r.json()["records"])


@contextlib.contextmanager
def start(tmp_path: Path, database_url: str, provider: OidcProvider, **overrides: Any) -> Iterator[Broker]:
    secrets_ = BrokerSecrets()
    settings = {k.removeprefix("BROKER_").lower(): v for k, v in provider.broker_env().items()}
    broker = build_broker(tmp_path, database_url, secrets_, POLICY, **{**settings, **overrides})
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Broker(client, secrets_)


@pytest.fixture
def broker(tmp_path: Path, database_url: str, oidc_provider: OidcProvider) -> Iterator[Broker]:
    with start(tmp_path, database_url, oidc_provider) as b:
        yield b


def forged(provider: OidcProvider, claim: str = "email", value: Any = KATE, **extra: Any) -> str:
    """A token signed by the provider's key, whose `claim` names `value`."""
    return provider.key.sign(_claims(provider, "human", **{claim: value, **extra}))


def test_real_idp_accounts_that_look_like_kate_are_refused(oidc_provider: OidcProvider, broker: Broker) -> None:
    kate = oidc_provider.device_login("kate")["access_token"]
    me = broker.client.get("/v1/whoami", headers=broker.as_(kate)).json()
    assert (me["kind"], me["name"]) == ("human", KATE)  # KATE@Example.com: ASCII case is one identity
    for login in LOOKALIKE_LOGINS:
        token = oidc_provider.device_login(login)["access_token"]
        r = broker.client.get("/v1/whoami", headers=broker.as_(token))
        assert (r.status_code, error_code(r)) == (401, "invalid-principal"), (login, r.text)


def _pending_deploy(broker: Broker) -> tuple[dict[str, Any], str]:
    r = broker.client.post("/v1/sessions", headers=broker.orchestrator, json={
        "human": ALICE, "agent": "claude-code", "task_id": "confusion", "ttl_seconds": 3600,
        "scope": [{"resource": "jwt://payments-api", "access": ["read", "deploy"]}]})
    assert r.status_code == 201, r.text
    session = r.json()
    r = broker.client.post("/v1/capabilities", headers=broker.as_(session["session_token"]), json=DEPLOY)
    assert r.status_code == 202 and r.json()["status"] == "pending_approval", r.text
    return session, r.json()["approval_id"]


def test_lookalikes_of_the_approver_approve_grant_and_mint_nothing(oidc_provider: OidcProvider, broker: Broker) -> None:
    session, approval_id = _pending_deploy(broker)
    agent = broker.as_(session["session_token"])
    tokens = [oidc_provider.device_login(login)["access_token"] for login in LOOKALIKE_LOGINS]
    tokens += [forged(oidc_provider, value=name) for name in CORPUS]
    outcomes = {}
    for i, token in enumerate(tokens):
        who = broker.as_(token)
        approve = broker.client.post(f"/v1/approvals/{approval_id}/approve", headers=who, json={"reason": "lgtm"})
        deny = broker.client.post(f"/v1/approvals/{approval_id}/deny", headers=who, json=None)
        grant = broker.client.post("/v1/grants", headers=who, json={
            "session_id": session["session_id"], "resource": "jwt://payments-api", "access": "deploy",
            "ttl_seconds": 600, "uses": 5})
        outcomes[i] = {(r.status_code, error_code(r)) for r in (approve, deny, grant)}
    assert all(o == {(401, "invalid-principal")} for o in outcomes.values()), outcomes

    # Nothing was decided, granted or minted: the approval waits, the agent still waits.
    assert broker.client.get(f"/v1/approvals/{approval_id}", headers=broker.admin).json()["status"] == "pending"
    r = broker.client.post("/v1/capabilities", headers=agent, json={**DEPLOY, "approval_id": approval_id})
    assert (r.status_code, error_code(r)) == (409, "approval-pending"), r.text
    types = [rec["type"] for rec in broker.records(session["session_id"])]
    assert "approval.decided" not in types and "grant.created" not in types and "capability.minted" not in types

    # The real kate, in whatever ASCII case her IdP spells her, is the approver: the setup works.
    kate = oidc_provider.device_login("kate")["access_token"]
    r = broker.client.post(f"/v1/approvals/{approval_id}/approve", headers=broker.as_(kate), json={"reason": "ok"})
    assert r.status_code == 200, r.text
    r = broker.client.post("/v1/capabilities", headers=agent, json={**DEPLOY, "approval_id": approval_id})
    assert r.status_code == 201, r.text
    decided = [rec for rec in broker.records(session["session_id"]) if rec["type"] == "approval.decided"]
    assert len(decided) == 1 and decided[0]["human_principal"] in (ALICE, KATE)


@pytest.mark.parametrize("claim", ["preferred_username", "sub", "upn"])
def test_every_principal_claim_is_held_to_the_canonical_form(tmp_path: Path, database_url: str,
                                                             oidc_provider: OidcProvider, claim: str) -> None:
    with start(tmp_path, database_url, oidc_provider, oidc_principal_claim=claim) as b:
        for spelling in SAME_AS_KATE:
            r = b.client.get("/v1/whoami", headers=b.as_(forged(oidc_provider, claim, spelling)))
            assert r.status_code == 200 and r.json()["name"] == KATE, r.text
        refused = {}
        for name in CORPUS:
            r = b.client.get("/v1/whoami", headers=b.as_(forged(oidc_provider, claim, name)))
            refused[name] = (r.status_code, error_code(r))
        assert set(refused.values()) == {(401, "invalid-principal")}, refused
        for not_a_name in (123, True, ["kate@example.com"], {"email": "kate@example.com"}):
            r = b.client.get("/v1/whoami", headers=b.as_(forged(oidc_provider, claim, not_a_name)))
            assert r.status_code == 401 and error_code(r) in ("invalid-principal", "invalid-token"), r.text


GROUPS_CORPUS = [
    "maintainers", "maintainers security", "", 7, True, {"name": "maintainers"}, [1], ["maintainers", None],
    ["maintainers", ["security"]], [" maintainers"], ["maintainers "], ["main tainers"], ["maintainers\u00a0"],
    ["\u3000maintainers"], ["main\u200btainers"], ["\u202emaintainers"], ["maintainers\u2066"], ["\ufeffmaintainers"],
    ["maint\x00ainers"], ["maintainers\n"], [""], ["g"] * 1001,
]


def test_a_groups_claim_that_is_not_a_list_of_clean_names_refuses_the_token(oidc_provider: OidcProvider,
                                                                             broker: Broker) -> None:
    for login in ("string-groups", "zwsp-groups"):  # from the real provider
        r = broker.client.get("/v1/whoami", headers=broker.as_(oidc_provider.device_login(login)["access_token"]))
        assert (r.status_code, error_code(r)) == (401, "invalid-groups-claim"), (login, r.text)
    outcomes = {}
    for i, groups in enumerate(GROUPS_CORPUS):
        r = broker.client.get("/v1/whoami", headers=broker.as_(forged(oidc_provider, groups=groups)))
        outcomes[i] = (r.status_code, error_code(r))
    assert set(outcomes.values()) == {(401, "invalid-groups-claim")}, outcomes
    ok = broker.client.get("/v1/whoami", headers=broker.as_(forged(oidc_provider, groups=["maintainers", "/a/b"])))
    assert ok.status_code == 200 and sorted(ok.json()["idp_groups"]) == ["/a/b", "maintainers"]


def test_a_session_a_kill_switch_and_an_explain_never_name_a_lookalike(oidc_provider: OidcProvider,
                                                                        broker: Broker) -> None:
    before = broker.client.get("/v1/sessions", headers=broker.admin).json()
    kate = broker.as_(forged(oidc_provider, value="Kate@Example.com"))
    outcomes = {}
    for name in [*CORPUS, " ", "kate@@example.com"]:
        provision = broker.client.post("/v1/sessions", headers=broker.orchestrator, json={
            "human": name, "agent": "claude-code", "task_id": "t", "ttl_seconds": 600,
            "scope": [{"resource": "jwt://payments-api", "access": ["read"]}]})
        kill = broker.client.post("/v1/revocations", headers=broker.admin, json={"human": name})
        ask = {"human": name, "agent": "claude-code", "scope": [{"resource": "jwt://payments-api", "access": ["deploy"]}],
               "resource": "jwt://payments-api", "access": "deploy"}
        explain = broker.client.post("/v1/policy/explain", headers=broker.admin, json=ask)
        outcomes[name] = {(r.status_code, error_code(r)) for r in (provision, kill, explain)}
        # kate explaining a look-alike of herself is explaining another human: refused before the name is read.
        as_kate = broker.client.post("/v1/policy/explain", headers=kate, json=ask)
        assert (as_kate.status_code, error_code(as_kate)) in (
            (403, "explain-other-human-forbidden"), (400, "nul-byte")), (name, as_kate.text)
    # A NUL never reaches the service: the request guard refuses it in any JSON body (nul-byte).
    wrong = {name: o for name, o in outcomes.items()
             if o != {(400, "nul-byte" if "\x00" in name else "invalid-principal")}}
    assert not wrong, wrong
    assert broker.client.get("/v1/sessions", headers=broker.admin).json() == before  # nothing half-written

    # Spelled in another ASCII case, kate's session is kate's.
    r = broker.client.post("/v1/sessions", headers=broker.orchestrator, json={
        "human": "KATE@EXAMPLE.COM", "agent": "claude-code", "task_id": "t", "ttl_seconds": 600,
        "scope": [{"resource": "jwt://payments-api", "access": ["read"]}]})
    assert r.status_code == 201, r.text
    mine = broker.client.get("/v1/sessions", headers=kate).json()
    assert [s["session_id"] for s in mine] == [r.json()["session_id"]] and mine[0]["human"] == KATE


LEGACY_ROWS = {  # stored before sessions kept the canonical form: only ASCII case may differ
    "ses_legacy_ascii": "KATE@Example.COM",
    "ses_legacy_kelvin": "\u212aATE@EXAMPLE.COM",  # lower() in SQL may turn U+212A into "k"
    "ses_legacy_kelvin_lower": "\u212aate@example.com",
    "ses_legacy_dotted": "kate@\u0130example.com",
    "ses_legacy_longs": "kate@example.com\u017f",
    "ses_legacy_zwsp": "kate@example.com\u200b",
}


def test_stored_rows_match_a_principal_only_by_ascii_case_in_sql(database_url: str) -> None:
    """The kill switch's and listings' WHERE clause, on the real database: PostgreSQL's lower() and
    upper() follow Unicode, so a row holding a look-alike must still match nobody."""
    upgrade(database_url)
    engine = create_engine(database_url)
    now = datetime.now(UTC)
    try:
        with Session(engine) as db:
            for sid, human in {**LEGACY_ROWS, "ses_canonical": KATE}.items():
                db.add(SessionRow(id=sid, human=human, agent="a", task_id="t", scope=[], labels={}, status="active",
                                  created_by="orch", created_at=now, expires_at=now))
            db.commit()
            for spelling in SAME_AS_KATE:
                found = sorted(db.exec(select(SessionRow.id).where(human_is(spelling))).all())
                assert found == ["ses_canonical", "ses_legacy_ascii"], (spelling, found)
    finally:
        engine.dispose()
