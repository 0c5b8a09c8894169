"""The aws provider against a real moto server over HTTP, with real boto3.

moto does not enforce IAM: any credential may call anything, a Deny never bites, and session
policies, tags and source identity are accepted and forgotten. So these tests prove two things
separately: what reached the server (moto's request recorder, `MotoServer.requests`), and
what the revocation policy document says (read back with GetRolePolicy and checked by
content). That a Deny on `aws:userid` = `<RoleId>:<session>` stops exactly that session is
AWS's documented evaluation, not something moto can show.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from broker.config import Settings
from broker.errors import Denied, Forbidden, InvalidRequest, ProviderMisconfigured, ProviderRejected, ProviderUnavailable
from broker.lifecycle import sweeper
from broker.plugins import PluginContext
from broker.providers.aws import (
    INLINE_POLICY_MAX_CHARS,
    REVOCATION_POLICY_NAME,
    AwsProvider,
    parse_role_resource,
    source_identity_for,
    tag_value_for,
)
from broker.providers.aws.settings import AwsSettings
from broker.providers.base import Grant, Minted, RevokeTarget, TtlBounds, fingerprint
from tests.support.aws_moto import (
    DUMMY_SECRET_ACCESS_KEY,
    MOTO_ACCOUNT,
    MOTO_REGION,
    AwsRole,
    MotoServer,
    trust_policy,
)
from tests.support.brokers import STANDARD_TIERS, Api, BrokerSecrets, LiveServer, build_broker
from tests.support.ports import free_port

SESSION_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::acme-artifacts/*"}],
}
STS_NAME = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)


def settings_for(endpoint: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"aws_endpoint_url": endpoint, "aws_region": MOTO_REGION, "provider_timeout_seconds": 3.0}
    return Settings(**(values | overrides))


def aws_provider(settings: Settings, session: Any = None) -> AwsProvider:
    """The provider with its own settings (AwsSettings) read as the broker would read them."""
    return AwsProvider(PluginContext(settings=settings).settings_for(AwsSettings),
                       timeout_seconds=settings.provider_timeout_seconds, session=session)


@pytest.fixture
def provider(aws_endpoint: str) -> AwsProvider:
    return aws_provider(settings_for(aws_endpoint))


def make_grant(role: AwsRole, *, ttl: int = 900, options: dict | None = None, **fields: str) -> Grant:
    values = {
        "capability_id": f"cap_{uuid.uuid4().hex}",
        "session_id": "ses_7f3a",
        "task_id": "acme/widgets#42",
        "human": "alice@example.com",
        "agent": "claude-code",
        **fields,
    }
    return Grant(
        resource=role.resource,
        access="read",
        tier="read",
        ttl_seconds=ttl,
        options={"session_policy": SESSION_POLICY} if options is None else options,
        **values,
    )


def target_for(grant: Grant, minted: Minted) -> RevokeTarget:
    return RevokeTarget(
        capability_id=grant.capability_id,
        session_id=grant.session_id,
        resource=grant.resource,
        access=grant.access,
        handle=minted.handle,
        expires_at=minted.expires_at,
    )


def sts_as(endpoint: str, credential: dict) -> Any:
    return boto3.client(
        "sts",
        endpoint_url=endpoint,
        region_name=credential["region"],
        aws_access_key_id=credential["access_key_id"],
        aws_secret_access_key=credential["secret_access_key"],
        aws_session_token=credential["session_token"],
    )


def revocation_doc(iam_client: Any, role: AwsRole) -> dict | None:
    try:
        return iam_client.get_role_policy(RoleName=role.name, PolicyName=REVOCATION_POLICY_NAME)["PolicyDocument"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "NoSuchEntity":
            return None
        raise


def denied_userids(doc: dict | None) -> list[str]:
    out: list[str] = []
    for st in (doc or {}).get("Statement", []):
        assert st["Effect"] == "Deny" and st["Action"] == "*" and st["Resource"] == "*"
        out += st.get("Condition", {}).get("StringEquals", {}).get("aws:userid", [])
    return out


# --- (a) mint: the credential works and is the session we named --------------------------------


def test_minted_credentials_are_the_named_role_session(
    provider: AwsProvider, aws_role: AwsRole, aws_endpoint: str
) -> None:
    grant = make_grant(aws_role, ttl=1800)
    before = datetime.now(UTC)
    minted = provider.mint(grant)

    who = sts_as(aws_endpoint, minted.credential).get_caller_identity()
    assert who["Arn"] == f"arn:aws:sts::{MOTO_ACCOUNT}:assumed-role/{aws_role.name}/{grant.capability_id}"
    assert who["UserId"] == f"{aws_role.role_id}:{grant.capability_id}" == minted.handle["assumed_role_id"]

    cred = minted.credential
    assert set(cred) == {"type", "access_key_id", "secret_access_key", "session_token", "expiration", "region"}
    assert cred["type"] == "aws_sts" and cred["region"] == MOTO_REGION
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cred["expiration"])
    assert timedelta(seconds=1790) <= minted.expires_at - before <= timedelta(seconds=1810)
    assert minted.fingerprint == fingerprint(cred["secret_access_key"])
    assert minted.revocation_secret is None  # revoking needs no secret

    handle = minted.handle
    assert handle["role_arn"] == aws_role.arn and handle["role_name"] == aws_role.name
    assert handle["session_name"] == grant.capability_id
    assert handle["access_key_id"] == cred["access_key_id"]
    assert handle["expires_at"] == cred["expiration"]
    assert not {cred["secret_access_key"], cred["session_token"]} & {str(v) for v in handle.values()}


def test_role_with_a_path(provider: AwsProvider, iam_client: Any, aws_endpoint: str) -> None:
    name = f"jit-test-{uuid.uuid4().hex[:12]}"
    role = iam_client.create_role(
        RoleName=name, Path="/agents/ci/", AssumeRolePolicyDocument=json.dumps(trust_policy()), MaxSessionDuration=3600
    )["Role"]
    try:
        path_role = AwsRole(name=f"agents/ci/{name}", arn=role["Arn"], role_id=role["RoleId"])
        grant = make_grant(path_role)
        minted = provider.mint(grant)
        assert minted.handle["role_arn"] == f"arn:aws:iam::{MOTO_ACCOUNT}:role/agents/ci/{name}"
        assert minted.handle["role_name"] == name
        who = sts_as(aws_endpoint, minted.credential).get_caller_identity()
        assert who["Arn"].endswith(f":assumed-role/{name}/{grant.capability_id}")
    finally:
        iam_client.delete_role(RoleName=name)


# --- (b) what reached STS ---------------------------------------------------------------------------


def test_assume_role_request_as_received(provider: AwsProvider, aws_role: AwsRole, moto_server: MotoServer) -> None:
    grant = make_grant(
        aws_role,
        ttl=2700,
        human="José García",
        task_id="ISSUE #42 (acme/widgets)",
        agent="claude-code",
        session_id="ses_01J9",
    )
    provider.mint(grant)

    [sent] = moto_server.requests("AssumeRole", RoleSessionName=grant.capability_id)
    assert sent.params["RoleArn"] == aws_role.arn
    assert sent.params["DurationSeconds"] == "2700"
    assert sent.params["SourceIdentity"] == "Jose_Garcia"
    assert json.loads(sent.params["Policy"]) == SESSION_POLICY
    assert sent.params["Policy"] == json.dumps(SESSION_POLICY, separators=(",", ":"))
    assert sent.tags == {"session": "ses_01J9", "agent": "claude-code", "task": "ISSUE _42 _acme/widgets_"}
    assert not [k for k in sent.params if k.startswith("TransitiveTagKeys")]


def test_no_session_policy_sends_none(provider: AwsProvider, aws_role: AwsRole, moto_server: MotoServer) -> None:
    grant = make_grant(aws_role, options={})
    provider.mint(grant)
    [sent] = moto_server.requests("AssumeRole", RoleSessionName=grant.capability_id)
    assert "Policy" not in sent.params


# --- (c) ttl bounds: denied, never stretched, nothing sent ---------------------------------------


def test_ttl_bounds_come_from_the_role_and_the_access(provider: AwsProvider, aws_role: AwsRole) -> None:
    assert provider.ttl_bounds(aws_role.resource, {}) == TtlBounds(900, 3600)
    assert provider.ttl_bounds(aws_role.resource, {"max_duration": 1800}) == TtlBounds(900, 1800)
    assert provider.ttl_bounds(aws_role.resource, {"max_duration": 43200}) == TtlBounds(900, 3600)
    with pytest.raises(ProviderMisconfigured):
        provider.ttl_bounds(aws_role.resource, {"max_duration": 600})


def test_ttl_below_the_sts_floor_is_denied_before_any_call(
    provider: AwsProvider, aws_role: AwsRole, moto_server: MotoServer
) -> None:
    seen = len(moto_server.requests())
    with pytest.raises(Denied) as caught:
        provider.mint(make_grant(aws_role, ttl=600))
    assert caught.value.code == "ttl-exceeds-provider-bounds" and caught.value.status == 403
    assert caught.value.details["min_seconds"] == 900
    assert len(moto_server.requests()) == seen  # not one request of any kind


@pytest.mark.parametrize(("ttl", "options"), [(3601, {}), (2700, {"max_duration": 1800})])
def test_ttl_above_the_role_or_access_max_is_denied_without_assume_role(
    provider: AwsProvider, aws_role: AwsRole, moto_server: MotoServer, ttl: int, options: dict
) -> None:
    grant = make_grant(aws_role, ttl=ttl, options=options)
    with pytest.raises(Denied) as caught:
        provider.mint(grant)
    assert caught.value.code == "ttl-exceeds-provider-bounds"
    # Reading the role's MaxSessionDuration (iam:GetRole) is the only way to know; STS never saw it.
    assert moto_server.requests("AssumeRole", RoleSessionName=grant.capability_id) == []
    assert moto_server.requests("AssumeRole", RoleArn=aws_role.arn) == []


def test_role_chaining_caps_the_max_at_one_hour(
    iam_client: Any, aws_endpoint: str, provider: AwsProvider, aws_role: AwsRole
) -> None:
    """A broker running on role credentials (IRSA, ECS, EC2) is role chaining: STS allows 1 h at most."""
    name = f"jit-test-{uuid.uuid4().hex[:12]}"
    long_role = iam_client.create_role(
        RoleName=name, AssumeRolePolicyDocument=json.dumps(trust_policy()), MaxSessionDuration=43200
    )["Role"]
    try:
        resource = f"aws://{MOTO_ACCOUNT}/role/{name}"
        assert provider.ttl_bounds(resource, {}) == TtlBounds(900, 43200)
        broker_creds = provider.mint(make_grant(aws_role)).credential  # the broker as a role session
        as_role = boto3.session.Session(
            aws_access_key_id=broker_creds["access_key_id"],
            aws_secret_access_key=broker_creds["secret_access_key"],
            aws_session_token=broker_creds["session_token"],
            region_name=MOTO_REGION,
        )
        chained = aws_provider(settings_for(aws_endpoint), session=as_role)
        assert chained.ttl_bounds(resource, {}) == TtlBounds(900, 3600)
    finally:
        iam_client.delete_role(RoleName=long_role["RoleName"])


# --- (d) session policy size ---------------------------------------------------------------------


def _policy_of_length(n: int) -> dict:
    base = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": ""}]}
    pad = n - len(json.dumps(base, separators=(",", ":")))
    base["Statement"][0]["Resource"] = "arn:aws:s3:::b/" + "x" * (pad - len("arn:aws:s3:::b/"))
    assert len(json.dumps(base, separators=(",", ":"))) == n
    return base


def test_oversize_session_policy_is_refused_before_any_call(
    provider: AwsProvider, aws_role: AwsRole, moto_server: MotoServer
) -> None:
    seen = len(moto_server.requests())
    with pytest.raises(InvalidRequest) as caught:
        provider.mint(make_grant(aws_role, options={"session_policy": _policy_of_length(2049)}))
    assert caught.value.code == "session-policy-too-large"
    assert caught.value.details == {"size": 2049, "limit": 2048}
    assert len(moto_server.requests()) == seen


def test_session_policy_at_the_limit_is_sent(provider: AwsProvider, aws_role: AwsRole, moto_server: MotoServer) -> None:
    policy = _policy_of_length(2048)
    grant = make_grant(aws_role, options={"session_policy": policy})
    provider.mint(grant)
    [sent] = moto_server.requests("AssumeRole", RoleSessionName=grant.capability_id)
    assert json.loads(sent.params["Policy"]) == policy


# --- (e) SourceIdentity and tag sanitising -----------------------------------------------------------


@pytest.mark.parametrize(
    ("human", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        ("aws:evil", "aws_evil"),
        ("AWS:evil", "AWS_evil"),
        ("Jane Doe", "Jane_Doe"),
        ("José García", "Jose_Garcia"),
        ("李雷", "__"),
        ("bob+ci=1,x.y@corp-1", "bob+ci=1,x.y@corp-1"),
        ("x", "x_"),
        ("", "__"),
        ("a" * 64, "a" * 64),
    ],
)
def test_source_identity_sanitising(human: str, expected: str) -> None:
    assert source_identity_for(human) == expected


def test_source_identity_long_names_are_clamped_and_stay_distinct() -> None:
    one, two = source_identity_for("a" * 70 + "@one.example"), source_identity_for("a" * 70 + "@two.example")
    assert len(one) == len(two) == 64 and one != two
    assert one.startswith("a" * 55 + "-")
    for value in (one, two, source_identity_for("aws:" + "ü" * 100)):
        assert STS_NAME.fullmatch(value) and not value.lower().startswith("aws:")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("acme/widgets#42", "acme/widgets_42"), ("李雷 review", "李雷 review"), ("a:b/c=d+e-f@g_h.i", "a:b/c=d+e-f@g_h.i")],
)
def test_tag_value_sanitising(value: str, expected: str) -> None:
    assert tag_value_for(value) == expected


def test_tag_value_is_clamped_to_256() -> None:
    assert len(tag_value_for("t" * 300)) == 256


@pytest.mark.parametrize(
    "resource",
    [
        "aws://12345/role/x",
        "aws://123456789012/user/x",
        "github://123456789012/role/x",
        "aws://123456789012/role/",
        "aws://123456789012/role/a b",
        "aws://123456789012/role/" + "r" * 65,
        "aws://123456789012",
    ],
)
def test_malformed_resource_is_invalid(resource: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_role_resource(resource)
    assert caught.value.code == "invalid-resource"


def test_role_in_another_account_is_refused(provider: AwsProvider, moto_server: MotoServer) -> None:
    grant = Grant(
        capability_id=f"cap_{uuid.uuid4().hex}", session_id="s", task_id="t", human="alice@example.com",
        agent="a", resource="aws://210987654321/role/elsewhere", access="read", tier="read", ttl_seconds=900,
    )
    with pytest.raises(Forbidden, match="own account") as caught:
        provider.mint(grant)
    assert (caught.value.status, caught.value.code) == (403, "cross-account-role")
    assert MOTO_ACCOUNT not in caught.value.message  # the broker's own account is not told to the caller
    assert moto_server.requests("AssumeRole", RoleSessionName=grant.capability_id) == []


def test_missing_role_is_rejected(provider: AwsProvider) -> None:
    role = AwsRole(name=f"absent-{uuid.uuid4().hex[:8]}", arn="", role_id="")
    with pytest.raises(ProviderRejected) as caught:
        provider.mint(make_grant(role))
    assert caught.value.details["aws_error"] == "NoSuchEntity"


# --- (f) revoke: a deny on exactly that session --------------------------------------------------------


def test_revoke_denies_that_session_and_no_other(
    provider: AwsProvider, aws_role: AwsRole, iam_client: Any, aws_endpoint: str, moto_server: MotoServer
) -> None:
    first, second = make_grant(aws_role), make_grant(aws_role)
    m1, m2 = provider.mint(first), provider.mint(second)

    said = provider.revoke(target_for(first, m1))
    # Confirmed (no valid_until): the receipt says `revoked`, naming the one session denied.
    assert said.valid_until is None and f"aws:userid {aws_role.role_id}:{first.capability_id} only" in said.detail
    doc = revocation_doc(iam_client, aws_role)
    assert doc is not None
    [statement] = doc["Statement"]
    assert statement["Effect"] == "Deny" and statement["Action"] == "*" and statement["Resource"] == "*"
    assert statement["Condition"] == {"StringEquals": {"aws:userid": [f"{aws_role.role_id}:{first.capability_id}"]}}
    # The value is exactly the aws:userid AWS evaluates for that session, and not the other's.
    first_userid = f"{aws_role.role_id}:{first.capability_id}"
    assert sts_as(aws_endpoint, m1.credential).get_caller_identity()["UserId"] == first_userid
    assert sts_as(aws_endpoint, m2.credential).get_caller_identity()["UserId"] not in denied_userids(doc)
    # The expiry rides in the Sid, rounded up to its bucket, never before the credential's own.
    expires_at, issued_by = map(int, re.fullmatch(r"ExpiresAt(\d+)IssuedBy(\d+)", statement["Sid"]).groups())
    assert m1.expires_at.timestamp() <= expires_at < m1.expires_at.timestamp() + 900
    assert issued_by >= (m1.expires_at - timedelta(seconds=first.ttl_seconds)).timestamp()

    puts = len(moto_server.requests("PutRolePolicy", RoleName=aws_role.name))
    again = provider.revoke(target_for(first, m1))  # twice: same document, not even a write
    assert again.valid_until is None and "already holds the deny" in again.detail
    assert denied_userids(revocation_doc(iam_client, aws_role)) == [f"{aws_role.role_id}:{first.capability_id}"]
    assert len(moto_server.requests("PutRolePolicy", RoleName=aws_role.name)) == puts

    provider.revoke(target_for(second, m2))
    assert sorted(denied_userids(revocation_doc(iam_client, aws_role))) == sorted(
        f"{aws_role.role_id}:{g.capability_id}" for g in (first, second)
    )


def test_a_stale_iam_read_does_not_lose_an_earlier_revocation(
    aws_endpoint: str, aws_role: AwsRole, iam_client: Any
) -> None:
    """IAM is eventually consistent: GetRolePolicy may not show a write made a second ago."""
    session = boto3.session.Session(region_name=MOTO_REGION)
    lagging: list[bool] = []

    def stale(**_: object) -> None:
        if lagging:
            raise ClientError({"Error": {"Code": "NoSuchEntity", "Message": "not yet visible"}}, "GetRolePolicy")

    session.events.register("before-call.iam.GetRolePolicy", stale)
    provider = aws_provider(settings_for(aws_endpoint), session=session)
    first, second = make_grant(aws_role), make_grant(aws_role)
    m1, m2 = provider.mint(first), provider.mint(second)
    provider.revoke(target_for(first, m1))
    lagging.append(True)  # from now on IAM "has not seen" the first write
    provider.revoke(target_for(second, m2))
    assert sorted(denied_userids(revocation_doc(iam_client, aws_role))) == sorted(
        f"{aws_role.role_id}:{g.capability_id}" for g in (first, second)
    )


def test_revoking_an_expired_credential_writes_nothing(
    provider: AwsProvider, aws_role: AwsRole, iam_client: Any
) -> None:
    grant = make_grant(aws_role)
    minted = provider.mint(grant)
    past = datetime.now(UTC) - timedelta(hours=2)
    said = provider.revoke(
        RevokeTarget(
            capability_id=grant.capability_id, session_id=grant.session_id, resource=grant.resource,
            access=grant.access, handle={**minted.handle, "expires_at": past.isoformat()}, expires_at=past,
        )
    )
    assert revocation_doc(iam_client, aws_role) is None
    # Not "revoked": it died on its own, at the (past) time the receipt gives as expires_at.
    assert said.valid_until is not None and said.valid_until <= past + timedelta(seconds=1)


def test_crash_recovery_handle_revokes_the_session(
    provider: AwsProvider, aws_role: AwsRole, iam_client: Any, aws_endpoint: str
) -> None:
    grant = make_grant(aws_role)
    provider.mint(grant)  # ...and the broker died before storing the handle
    fresh = aws_provider(settings_for(aws_endpoint))
    handle = fresh.find_by_capability(grant.capability_id, grant.resource)
    assert handle["assumed_role_id"] == f"{aws_role.role_id}:{grant.capability_id}"
    assert handle["role_arn"] == aws_role.arn and handle["session_name"] == grant.capability_id
    fresh.revoke(
        RevokeTarget(
            capability_id=grant.capability_id, session_id=grant.session_id, resource=grant.resource,
            access=grant.access, handle=handle, expires_at=datetime.now(UTC) + timedelta(seconds=900),
        )
    )
    assert denied_userids(revocation_doc(iam_client, aws_role)) == [handle["assumed_role_id"]]

    # The lease service may also revoke a lease that never got a handle at all (`handle={}`).
    orphan = make_grant(aws_role)
    fresh.mint(orphan)
    fresh.revoke(
        RevokeTarget(
            capability_id=orphan.capability_id, session_id=orphan.session_id, resource=orphan.resource,
            access=orphan.access, handle={}, expires_at=datetime.now(UTC) + timedelta(seconds=900),
        )
    )
    assert f"{aws_role.role_id}:{orphan.capability_id}" in denied_userids(revocation_doc(iam_client, aws_role))


# --- (g) prune --------------------------------------------------------------------------------------------


def test_prune_drops_expired_entries_and_then_the_policy(
    provider: AwsProvider, aws_role: AwsRole, iam_client: Any, aws_endpoint: str
) -> None:
    short, long = make_grant(aws_role, ttl=900), make_grant(aws_role, ttl=3600)
    ms, ml = provider.mint(short), provider.mint(long)
    provider.revoke(target_for(short, ms))
    provider.revoke(target_for(long, ml))
    now = datetime.now(UTC)

    assert provider.prune_revocations(now) == 0  # nothing has expired
    assert len(denied_userids(revocation_doc(iam_client, aws_role))) == 2

    # Past the short one's expiry (plus bucket and clock grace), before the long one's.
    assert provider.prune_revocations(now + timedelta(seconds=3000)) == 1
    assert denied_userids(revocation_doc(iam_client, aws_role)) == [f"{aws_role.role_id}:{long.capability_id}"]

    # After a restart the process has no memory of the role: the lease service names it.
    restarted = aws_provider(settings_for(aws_endpoint))
    assert restarted.prune_revocations(now + timedelta(days=1)) == 0
    assert restarted.prune_revocations(now + timedelta(days=1), resources=[aws_role.resource]) == 1
    assert revocation_doc(iam_client, aws_role) is None  # empty: the policy itself is gone


# --- overflow: the blunter TokenIssueTime fallback -------------------------------------------------------


def _seed_full_policy(iam_client: Any, role: AwsRole) -> tuple[int, int]:
    """Fill the revocation policy with fake revoked sessions until one more would not fit."""
    now = math.floor(datetime.now(UTC).timestamp())
    end, issued_by = (now // 900 + 4) * 900, now - 100
    ids: list[str] = []
    doc = {
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": f"ExpiresAt{end}IssuedBy{issued_by}", "Effect": "Deny", "Action": "*", "Resource": "*",
            "Condition": {"StringEquals": {"aws:userid": ids}},
        }],
    }
    while len(json.dumps(doc, separators=(",", ":"))) < INLINE_POLICY_MAX_CHARS - 61:
        ids.append(f"{role.role_id}:cap_{len(ids):032x}")
    assert len(json.dumps(doc, separators=(",", ":"))) <= INLINE_POLICY_MAX_CHARS
    assert len(ids) > 150
    iam_client.put_role_policy(RoleName=role.name, PolicyName=REVOCATION_POLICY_NAME, PolicyDocument=json.dumps(doc))
    return end, issued_by


def _fallback(doc: dict) -> tuple[datetime, int]:
    [st] = [s for s in doc["Statement"] if "DateLessThan" in s.get("Condition", {})]
    assert st["Effect"] == "Deny" and st["Action"] == "*" and st["Resource"] == "*"
    before = datetime.fromisoformat(st["Condition"]["DateLessThan"]["aws:TokenIssueTime"].replace("Z", "+00:00"))
    return before, int(re.fullmatch(r"IssuedBefore\d+ExpiresAt(\d+)", st["Sid"]).group(1))


def test_overflow_collapses_into_a_token_issue_time_deny(
    provider: AwsProvider, aws_role: AwsRole, iam_client: Any
) -> None:
    seeded_end, seeded_issued = _seed_full_policy(iam_client, aws_role)
    grant = make_grant(aws_role, ttl=3600)
    minted = provider.mint(grant)
    said = provider.revoke(target_for(grant, minted))
    assert said.valid_until is None and "every session of the role issued before" in said.detail  # blunter, said so

    doc = revocation_doc(iam_client, aws_role)
    assert denied_userids(doc) == []  # every per-session entry was folded into the fallback
    before, until = _fallback(doc)
    issued = datetime.fromisoformat(minted.handle["issued_at"].replace("Z", "+00:00"))
    assert issued < before <= issued + timedelta(seconds=2)  # covers the newest revoked, no later
    assert before.timestamp() > seeded_issued
    assert until >= max(seeded_end, minted.expires_at.timestamp())
    assert len(json.dumps(doc, separators=(",", ":"))) < 1000

    # A session issued in the same second is already inside the fallback: nothing to add.
    same_second = make_grant(aws_role)
    provider.revoke(target_for(same_second, provider.mint(same_second)))
    assert revocation_doc(iam_client, aws_role) == doc

    # One issued after it goes back to a precise per-session entry beside the fallback.
    later = make_grant(aws_role)
    minted_later = provider.mint(later)
    after = {**minted_later.handle, "issued_at": (before + timedelta(seconds=5)).isoformat()}
    provider.revoke(RevokeTarget(
        capability_id=later.capability_id, session_id=later.session_id, resource=later.resource,
        access=later.access, handle=after, expires_at=minted_later.expires_at,
    ))
    assert denied_userids(revocation_doc(iam_client, aws_role)) == [f"{aws_role.role_id}:{later.capability_id}"]
    assert _fallback(revocation_doc(iam_client, aws_role)) == (before, until)


def test_iam_limit_exceeded_falls_back_too(aws_endpoint: str, aws_role: AwsRole, iam_client: Any) -> None:
    """Other inline policies share the role's 10,240 characters: IAM's LimitExceeded triggers the fallback."""
    session = boto3.session.Session(region_name=MOTO_REGION)
    refusals: list[int] = []

    def refuse_first_put(**_: object) -> None:
        if not refusals:
            refusals.append(1)
            raise ClientError(
                {"Error": {"Code": "LimitExceeded", "Message": "Maximum policy size of 10240 bytes exceeded"}},
                "PutRolePolicy",
            )

    session.events.register("before-call.iam.PutRolePolicy", refuse_first_put)
    provider = aws_provider(settings_for(aws_endpoint), session=session)
    grant = make_grant(aws_role)
    provider.revoke(target_for(grant, provider.mint(grant)))
    assert refusals == [1]
    doc = revocation_doc(iam_client, aws_role)
    assert denied_userids(doc) == [] and _fallback(doc)


# --- (h) unreachable, misconfigured, and no secrets in errors -------------------------------------------


def test_unreachable_endpoint_is_unavailable_and_leaks_nothing(provider: AwsProvider, aws_role: AwsRole) -> None:
    dead = aws_provider(settings_for(f"http://127.0.0.1:{free_port()}", provider_timeout_seconds=1.0))
    grant = make_grant(aws_role)
    with pytest.raises(ProviderUnavailable) as on_mint:
        dead.mint(grant)

    minted = provider.mint(grant)
    with pytest.raises(ProviderUnavailable) as on_revoke:
        dead.revoke(target_for(grant, minted))

    secrets = [minted.credential["secret_access_key"], minted.credential["session_token"], DUMMY_SECRET_ACCESS_KEY]
    for caught in (on_mint, on_revoke):
        exc = caught.value
        assert exc.status == 503 and exc.code == "provider-unavailable"
        assert exc.__cause__ is None and exc.__suppress_context__  # no botocore object rides along
        text = " ".join([str(exc), repr(exc), json.dumps(exc.to_body(), default=str)])
        assert not [s for s in secrets if s in text]


def test_no_credentials_is_misconfigured(aws_endpoint: str, aws_role: AwsRole, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    bare = aws_provider(settings_for(aws_endpoint))
    with pytest.raises(ProviderMisconfigured, match="no AWS credentials"):
        bare.mint(make_grant(aws_role))
    health = bare.health()
    assert not health.ok and "no AWS credentials" in health.detail


# --- (i) health ------------------------------------------------------------------------------------------


def test_health(provider: AwsProvider) -> None:
    health = provider.health()
    assert health.ok and f":{MOTO_ACCOUNT}:" in health.detail
    dead = aws_provider(settings_for(f"http://127.0.0.1:{free_port()}", provider_timeout_seconds=1.0)).health()
    assert not dead.ok and dead.detail


def test_from_context_and_name(aws_endpoint: str) -> None:
    from broker.providers.base import Provider, ProviderContext

    built = AwsProvider.from_context(ProviderContext(settings=settings_for(aws_endpoint)))
    assert built.name == "aws" and isinstance(built, Provider)


# --- (h) the sweeper prunes, also after a restart ---------------------------------------------------

SWEEP_POLICY = STANDARD_TIERS + """\
resources:
  - match: "aws://123456789012/role/*"
    provider: aws
    access: {read: {tier: read}}
humans:
  alice@example.com: {grants: [{resource: "aws://**", access: ["*"]}]}
agents:
  claude-code: {max_tier: read}
"""


def test_the_sweeper_prunes_deny_entries_after_expiry_even_after_a_restart(
    database_url: str, tmp_path: Path, aws_endpoint: str, aws_role: AwsRole, iam_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sweeper, "PRUNE_INTERVAL_SECONDS", 0.0)  # every pass, for the test
    secrets_ = BrokerSecrets()
    aws = {"aws_endpoint_url": aws_endpoint, "aws_region": MOTO_REGION}
    broker = build_broker(tmp_path, database_url, secrets_, SWEEP_POLICY, **aws)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, broker, client)
        session = api.new_session(scope=[{"resource": "aws://**", "access": ["*"]}])
        r = api.request(session, {"resource": aws_role.resource, "access": "read", "ttl_seconds": 900})
        assert r.status_code == 201, r.text
        issued = r.json()
        r = client.delete(f"/v1/capabilities/{issued['capability_id']}", headers=api.as_admin())
        assert r.status_code == 200 and r.json()["status"] == "revoked", r.text
    denied = f"{aws_role.role_id}:{issued['capability_id']}"
    assert denied in denied_userids(revocation_doc(iam_client, aws_role))

    # A restarted broker: its provider has no memory of the role; the revoked lease names it.
    restarted = build_broker(tmp_path, database_url, secrets_, SWEEP_POLICY, **aws)
    expired_at = datetime.fromisoformat(issued["expires_at"])
    sweeper.sweep_once(restarted, now=expired_at - timedelta(seconds=60))
    assert denied in denied_userids(revocation_doc(iam_client, aws_role))  # still live: kept
    sweeper.sweep_once(restarted, now=expired_at + timedelta(minutes=30))  # bucket (15 min) + grace (5 min)
    assert revocation_doc(iam_client, aws_role) is None  # nothing left to deny: the policy is gone
