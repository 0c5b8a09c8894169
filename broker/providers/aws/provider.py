"""The AwsProvider: AssumeRole to mint, the revocation policy to revoke, SDK errors translated at the boundary."""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import boto3
from botocore.exceptions import (
    ClientError,
)
from pydantic_settings import BaseSettings

from broker.errors import Denied, ProviderError, ProviderMisconfigured, ProviderRejected, ProviderUnavailable
from broker.grammar import ResourceGrammar, RuleCheck
from broker.providers.aws.client import AwsClient, PolicyTooLarge, client_error, error_code, is_role_session, translated
from broker.providers.aws.grammar import GRAMMAR, own_account_check
from broker.providers.aws.names import (
    CHAINED_MAX_DURATION,
    CLOCK_GRACE_SECONDS,
    INLINE_POLICY_MAX_CHARS,
    REVOCATION_POLICY_NAME,
    STS_MIN_DURATION,
    RoleRef,
    _max_duration_option,
    _parse_time,
    _partition,
    parse_role_resource,
    session_name_for,
    session_policy_text,
    source_identity_for,
    tag_value_for,
)
from broker.providers.aws.revocations import RevocationPolicy
from broker.providers.aws.settings import AwsSettings
from broker.providers.base import (
    Grant,
    Minted,
    Provider,
    ProviderContext,
    ProviderHealth,
    Revoked,
    RevokeTarget,
    TtlBounds,
    fingerprint,
)
from broker.times import rfc3339

log = logging.getLogger("broker.providers.aws")


# --- the provider ------------------------------------------------------------------------------


class AwsProvider(Provider):
    name: ClassVar[str] = "aws"
    searchable: ClassVar[bool] = True  # the session name is the capability id

    grammar: ClassVar[ResourceGrammar] = GRAMMAR
    settings_model: ClassVar[type[BaseSettings]] = AwsSettings

    def __init__(self, settings: AwsSettings, *, timeout_seconds: float = 10.0,
                 session: boto3.session.Session | None = None) -> None:
        self._settings = settings
        self._partition = _partition(settings.aws_region)
        self.client = AwsClient(settings, timeout_seconds=timeout_seconds, session=session)
        self._guard = threading.Lock()
        self._role_locks: dict[str, threading.Lock] = {}
        self._revoked_on: dict[str, RoleRef] = {}  # roles this process wrote a deny on: prune them
        self._written: dict[str, RevocationPolicy] = {}  # role ARN -> the document this process put last

    @classmethod
    def from_context(cls, ctx: ProviderContext) -> AwsProvider:
        settings = ctx.settings_for(AwsSettings)
        session = boto3.session.Session(region_name=settings.aws_region)
        # Refuse at start rather than at the first request: a provider that cannot sign
        # anything is misconfigured, and readiness should not probe AWS to find that out.
        if session.get_credentials() is None:
            raise ProviderMisconfigured(
                "aws: no AWS credentials found for the broker (environment, shared config, web identity or instance role)"
            )
        return cls(settings, timeout_seconds=ctx.settings.provider_timeout_seconds, session=session)

    def policy_check(self) -> RuleCheck | None:
        """Rules must be for the broker's own account: BROKER_AWS_ACCOUNT_ID, else STS (asked now).

        Unknown (STS unreachable at start) leaves the request-time check alone in force, with a warning."""
        account = self._settings.aws_account_id
        if account is None:
            try:
                account = self.client.account_id()
            except ProviderError as exc:
                log.warning("aws: cannot learn the broker's own account at start (%s); set BROKER_AWS_ACCOUNT_ID so "
                            "policies with rules for other accounts are refused when they load", exc.code)
                return None
        return own_account_check(account)

    # --- bounds ----------------------------------------------------------------------------

    def ttl_bounds(self, resource: str, options: dict[str, Any]) -> TtlBounds:
        """900 s .. the role's MaxSessionDuration, capped at 1 h under role chaining and by `max_duration`."""
        ref = self._ref(resource)
        cap = _max_duration_option(options)
        most = self.client.role(ref).max_session_seconds
        if is_role_session(self.client.whoami().arn):
            most = min(most, CHAINED_MAX_DURATION)
        if cap is not None:
            most = min(most, cap)
        return TtlBounds(min_seconds=STS_MIN_DURATION, max_seconds=most)

    def revocation_lock_key(self, resource: str) -> str:
        """What the lease service serialises revocations on: one role's policy is read-modify-write."""
        return "aws-role:" + self._ref(resource).arn

    # --- mint --------------------------------------------------------------------------------

    def mint(self, grant: Grant) -> Minted:
        # Everything checkable without AWS is checked first: a refusal costs no call.
        ref = self._ref(grant.resource)
        session_name = session_name_for(grant.capability_id)
        policy = session_policy_text(grant.options)
        _max_duration_option(grant.options)
        if grant.ttl_seconds < STS_MIN_DURATION:
            raise self._ttl_denied(grant, ref, STS_MIN_DURATION, None)
        bounds = self.ttl_bounds(grant.resource, grant.options)
        if not bounds.min_seconds <= grant.ttl_seconds <= bounds.max_seconds:
            raise self._ttl_denied(grant, ref, bounds.min_seconds, bounds.max_seconds)

        params: dict[str, Any] = {
            "RoleArn": ref.arn,
            "RoleSessionName": session_name,
            "DurationSeconds": grant.ttl_seconds,
            "SourceIdentity": source_identity_for(grant.human),
            "Tags": [
                {"Key": "session", "Value": tag_value_for(grant.session_id)},
                {"Key": "agent", "Value": tag_value_for(grant.agent)},
                {"Key": "task", "Value": tag_value_for(grant.task_id)},
            ],
            # No TransitiveTagKeys: a chained session must not carry the broker's tags on.
        }
        if policy is not None:
            params["Policy"] = policy
        with translated(f"sts:AssumeRole on {ref.arn}"):
            out = self.client.sts.assume_role(**params)

        creds = out["Credentials"]
        expires = _parse_time(creds["Expiration"])
        if expires is None:
            raise ProviderRejected("sts:AssumeRole returned credentials without an expiration")
        # On AWS's clock, not ours; rounded up, as it bounds "issued no later than" in the fallback.
        issued = expires - timedelta(seconds=grant.ttl_seconds)
        issued = datetime.fromtimestamp(math.ceil(issued.timestamp()), UTC)
        credential = {
            "type": "aws_sts",
            "access_key_id": creds["AccessKeyId"],
            "secret_access_key": creds["SecretAccessKey"],
            "session_token": creds["SessionToken"],
            "expiration": rfc3339(expires),
            "region": self._settings.aws_region,
        }
        handle = {
            "role_arn": ref.arn,
            "role_name": ref.name,
            "session_name": session_name,
            "access_key_id": creds["AccessKeyId"],
            "assumed_role_id": out["AssumedRoleUser"]["AssumedRoleId"],
            "expires_at": rfc3339(expires),
            "issued_at": rfc3339(issued),
        }
        return Minted(
            credential=credential, handle=handle, expires_at=expires, fingerprint=fingerprint(creds["SecretAccessKey"])
        )

    def _ttl_denied(self, grant: Grant, ref: RoleRef, least: int, most: int | None) -> Denied:
        span = f"{least}..{most} s" if most is not None else f"at least {least} s"
        return Denied(
            f"ttl {grant.ttl_seconds} s is outside what STS can issue for {ref.arn} ({span}); "
            "the broker never stretches a ttl, ask for one within the bounds",
            code="ttl-exceeds-provider-bounds",
            ttl_seconds=grant.ttl_seconds,
            min_seconds=least,
            max_seconds=most,
        )

    # --- revoke ------------------------------------------------------------------------------

    def revoke(self, target: RevokeTarget) -> Revoked:
        """Deny this session (and only it) on its role until its credential would have expired.

        Confirmed (the receipt's `revoked`) once IAM accepted the PutRolePolicy that carries the
        deny, or the deny was found there already. IAM applies it within seconds; the receipt
        says so. A credential past its expiry needs no deny: `expires_naturally`, in the past."""
        ref = self._ref(target.resource)
        handle = target.handle or {}
        session_name = handle.get("session_name") or session_name_for(target.capability_id)
        now = datetime.now(UTC)
        # The later of AWS's own expiry (from the mint) and the lease's: a recovered handle has only the latter.
        expires = max(t for t in (_parse_time(handle.get("expires_at")), _parse_time(target.expires_at)) if t)
        if expires + timedelta(seconds=CLOCK_GRACE_SECONDS) <= now:  # expired on its own: nothing left to deny
            return Revoked(detail=f"the STS credentials expired at {rfc3339(expires)}; nothing left to deny",
                           valid_until=expires)
        userid = handle.get("assumed_role_id") or f"{self.client.role(ref).role_id}:{session_name}"
        issued_at = _parse_time(handle.get("issued_at")) or now + timedelta(seconds=CLOCK_GRACE_SECONDS)
        exp_s, issued_s = math.ceil(expires.timestamp()), math.ceil(issued_at.timestamp())

        with self._role_lock(ref):
            self._revoked_on[ref.arn] = ref
            policy = self._read_revocations(ref)
            changed = policy.prune(math.floor(now.timestamp())) > 0
            if policy.covers(userid, exp_s, issued_s):
                if changed:
                    self._store(ref, policy)
                return Revoked(detail=f"IAM already holds the deny on {ref.arn} for this session ({userid})")
            policy.add(userid, exp_s, issued_s)
            collapsed = policy.size() > INLINE_POLICY_MAX_CHARS
            if collapsed:
                policy.collapse()
            try:
                self._store(ref, policy)
            except PolicyTooLarge as exc:
                if collapsed:
                    raise exc.error from None
                # The role's other inline policies leave less room than this one alone needs.
                policy.collapse()
                collapsed = True
                self._store(ref, policy)
            if collapsed:
                log.warning(
                    "revocation deny on %s overflowed the inline policy limit: now denying every session "
                    "of the role issued before %s (unrevoked ones too)",
                    ref.arn,
                    rfc3339(datetime.fromtimestamp(policy.fallback[0], UTC)) if policy.fallback else "?",
                )
            log.info("denied session %s on %s until %s", userid, ref.arn, rfc3339(expires))
        how = ("every session of the role issued before the newest revoked one (the per-session deny overflowed "
               "the inline policy limit)") if collapsed else f"aws:userid {userid} only"
        return Revoked(detail=f"IAM accepted the deny on {ref.arn} ({REVOCATION_POLICY_NAME}) for {how}, until "
                              f"{rfc3339(expires)}; IAM applies it within seconds, to calls made after that")

    def prune_revocations(self, now: datetime, resources: Iterable[str] = ()) -> int:
        """Drop deny entries whose credential has expired anyway; delete the policy when empty.

        Covers the roles this process has revoked on, plus `resources` (the lease service can
        pass the roles of recently revoked leases after a restart). Returns the entries removed;
        a role that cannot be pruned is logged and skipped, revoke itself prunes it next time.
        """
        refs = dict(self._revoked_on)
        for resource in resources:
            ref = self._ref(resource)
            refs.setdefault(ref.arn, ref)
        removed = 0
        for ref in refs.values():
            try:
                with self._role_lock(ref):
                    policy = self._read_revocations(ref)
                    gone = policy.prune(math.floor(now.timestamp()))
                    if gone:
                        self._store(ref, policy)
                    if policy.is_empty():
                        self._revoked_on.pop(ref.arn, None)
                    removed += gone
            except (ProviderRejected, ProviderUnavailable, ProviderMisconfigured) as exc:
                log.warning("could not prune revocations on %s: %s", ref.arn, exc.message)
            except PolicyTooLarge as exc:
                log.warning("could not prune revocations on %s: %s", ref.arn, exc.error)
        return removed

    def _read_revocations(self, ref: RoleRef) -> RevocationPolicy:
        """The policy as IAM has it (other replicas' entries), united with this process's last write."""
        with translated(f"iam:GetRolePolicy on {ref.arn}"):
            try:
                raw = self.client.iam.get_role_policy(RoleName=ref.name, PolicyName=REVOCATION_POLICY_NAME)["PolicyDocument"]
            except ClientError as exc:
                if error_code(exc) != "NoSuchEntity":
                    raise
                raw = None  # no deny yet (a missing role shows on write)
        policy = RevocationPolicy.parse(json.loads(raw) if isinstance(raw, str) else raw)
        if ref.arn in self._written:
            policy.merge(self._written[ref.arn])
        return policy

    def _store(self, ref: RoleRef, policy: RevocationPolicy) -> None:
        """Put the policy, or delete it when empty. Raises PolicyTooLarge on IAM's LimitExceeded."""
        action = f"iam:PutRolePolicy on {ref.arn}"
        with translated(action):
            try:
                if policy.is_empty():
                    try:
                        self.client.iam.delete_role_policy(RoleName=ref.name, PolicyName=REVOCATION_POLICY_NAME)
                    except ClientError as exc:
                        if error_code(exc) != "NoSuchEntity":  # already gone is what we wanted
                            raise
                else:
                    self.client.iam.put_role_policy(
                        RoleName=ref.name, PolicyName=REVOCATION_POLICY_NAME, PolicyDocument=policy.text()
                    )
                self._written[ref.arn] = copy.deepcopy(policy)
            except ClientError as exc:
                if error_code(exc) == "LimitExceeded":
                    raise PolicyTooLarge(client_error(exc, action)) from None
                if error_code(exc) == "NoSuchEntity":
                    # Not "revoked on hope": with the role deleted, a resource policy that named
                    # its unique id might still honour the session. Pending until it expires.
                    raise ProviderRejected(
                        f"role {ref.arn} no longer exists, so the revocation deny cannot be attached; "
                        "the lease stays pending until the credential's own expiry",
                        aws_error="NoSuchEntity",
                    ) from None
                raise

    # --- crash recovery ------------------------------------------------------------------------

    def find_by_capability(self, capability_id: str, resource: str) -> dict[str, Any] | None:
        """The handle of a session that may have been minted before a crash.

        STS has no list of live sessions, but none is needed: the session name is the
        capability id, so the handle follows from the resource. It is returned whether or not
        AssumeRole got through; revoking a session that never existed costs one deny entry
        that is pruned with the rest.
        """
        ref = self._ref(resource)
        session_name = session_name_for(capability_id)
        return {
            "role_arn": ref.arn,
            "role_name": ref.name,
            "session_name": session_name,
            "access_key_id": None,
            "assumed_role_id": f"{self.client.role(ref).role_id}:{session_name}",
            "expires_at": None,
            "issued_at": None,
            "recovered": True,
        }

    # --- health ------------------------------------------------------------------------------

    def health(self) -> ProviderHealth:
        return self.client.health()

    # --- lookups -------------------------------------------------------------------------------

    def _ref(self, resource: str) -> RoleRef:
        return parse_role_resource(resource, self._partition)

    def _role_lock(self, ref: RoleRef) -> threading.Lock:
        with self._guard:
            return self._role_locks.setdefault(ref.arn, threading.Lock())
