"""The aws provider: STS AssumeRole credentials keyed to one capability, revoked by an inline deny.

Mint: `AssumeRole` on the resource's role with `RoleSessionName` = capability id,
`SourceIdentity` = the delegating human, session tags `session`/`agent`/`task`,
`DurationSeconds` = the granted ttl and the access's `session_policy` (the session can do
what the role's policies AND the session policy both allow, never more).

Revoke: STS credentials cannot be deleted. The broker keeps one inline policy,
`jit-broker-revoked-sessions`, on each role it has revoked a session of:

    {"Version": "2012-10-17", "Statement": [
      {"Sid": "ExpiresAt1767225600IssuedBy1767222000", "Effect": "Deny", "Action": "*",
       "Resource": "*", "Condition": {"StringEquals": {"aws:userid": ["AROA...:cap_1", ...]}}},
      {"Sid": "IssuedBefore1767222001ExpiresAt1767225600", ...     (overflow fallback only)
       "Condition": {"DateLessThan": {"aws:TokenIssueTime": "2026-01-01T00:00:01Z"}}}]}

`aws:userid` of a role session is `<RoleId>:<RoleSessionName>`, and the session name is the
capability id, so a statement denies exactly the revoked sessions and no other session of the
role. Entries are grouped in statements by expiry bucket (the Sid carries the bucket's end and
the newest issue time in it), so `prune_revocations` drops them once every credential they
name has expired anyway, and deletes the policy when nothing is left.

Limits, said plainly (README material):
- IAM is eventually consistent: a deny takes effect seconds (rarely minutes) after
  PutRolePolicy returns, and only for calls made after that. A request already in flight,
  or a long-running operation it started (e.g. a multipart upload already authorised), is
  not undone.
- A role's inline policies share 10,240 non-whitespace characters (about 150 revoked
  sessions here). When the deny would not fit, the per-session statements collapse into one
  statement denying every session of the role issued no later than the newest revoked one
  (`aws:TokenIssueTime`). That is blunter: live, unrevoked sessions of the same role issued
  before it stop working too, and their holders must ask again. Sessions issued afterwards are
  untouched.
- The policy is rewritten read-modify-write, and IAM reads can lag its writes by seconds.
  Within one process a per-role lock serialises the writes and every read is united with the
  process's own last write, so nothing is lost. Across replicas the lease service must
  serialise revocations per role (its DB claim keyed on `revocation_lock_key(resource)`); even
  then a replica may read a document a few seconds stale, so re-running `revoke` on recently
  revoked leases after the propagation delay (idempotent: one read, no write when the entry
  is there) repairs an entry lost that way.
- The broker's own identity needs iam:GetRole, iam:GetRolePolicy, iam:PutRolePolicy and
  iam:DeleteRolePolicy on every role it mints for, and those roles must live in the broker's
  own account (IAM calls act on the caller's account). Cross-account roles are refused
  rather than minted without a way to revoke them. Service-linked roles cannot be used.
- Resource-based policies that grant to the role ARN are still cut off: an explicit deny in
  the session's identity policy wins over any allow.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from broker.config import Settings
from broker.errors import Denied, InvalidRequest, ProviderMisconfigured, ProviderRejected, ProviderUnavailable
from broker.providers.base import Grant, Minted, ProviderContext, ProviderHealth, RevokeTarget, TtlBounds, fingerprint

log = logging.getLogger(__name__)

REVOCATION_POLICY_NAME = "jit-broker-revoked-sessions"
STS_MIN_DURATION = 900  # AssumeRole's floor
CHAINED_MAX_DURATION = 3600  # a role session assuming another role (role chaining) gets at most 1 h
SESSION_POLICY_MAX_CHARS = 2048  # plaintext limit of an inline session policy
INLINE_POLICY_MAX_CHARS = 10240  # all inline policies of a role together, whitespace not counted
TAG_VALUE_MAX = 256
SOURCE_IDENTITY_MAX = 64
BUCKET_SECONDS = 900  # revoked sessions expiring within the same 15 min share one statement
# Broker and AWS clocks differ; a deny outlives its credential by this much, and a recovered
# session whose issue time is unknown is assumed issued up to this far in the future.
CLOCK_GRACE_SECONDS = 300
ROLE_CACHE_SECONDS = 300  # MaxSessionDuration can be edited; re-read it every 5 min

_NAME = re.compile(r"[\w+=,.@-]+", re.ASCII)  # IAM role names, path segments, STS session names
_ACCOUNT = re.compile(r"\d{12}")
_SOURCE_IDENTITY_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+=,.@-")
_TAG_EXTRA = frozenset("_.:/=+-@")  # besides letters, digits and spaces ([\p{L}\p{Z}\p{N}_.:/=+\-@])
_BUCKET_SID = re.compile(r"ExpiresAt(\d+)IssuedBy(\d+)")
_FALLBACK_SID = re.compile(r"IssuedBefore(\d+)ExpiresAt(\d+)")

# ClientError codes, sorted by whose fault they are. Anything else the backend refused is
# ProviderRejected; any HTTP 5xx is ProviderUnavailable.
_UNAVAILABLE = frozenset({
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "ServiceUnavailable", "ServiceUnavailableException", "InternalFailure", "InternalError",
    "RequestTimeout", "RequestTimeoutException", "IDPCommunicationError",
})
_MISCONFIGURED = frozenset({
    "InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException",
    "IncompleteSignature", "MissingAuthenticationToken", "InvalidAccessKeyId", "ExpiredToken",
    "ExpiredTokenException", "AuthFailure",
})


# --- names and values AWS accepts -----------------------------------------------------------


@dataclass(frozen=True)
class RoleRef:
    """A role named by a resource `aws://<account>/role/<path/>name`."""

    account: str
    path: str  # "/" or "/team/agents/"
    name: str
    partition: str = "aws"

    @property
    def arn(self) -> str:
        return f"arn:{self.partition}:iam::{self.account}:role{self.path}{self.name}"


def parse_role_resource(resource: str, partition: str = "aws") -> RoleRef:
    scheme, sep, rest = resource.partition("://")
    account, _, tail = rest.partition("/")
    kind, _, role_path = tail.partition("/")
    segments = role_path.split("/")
    path = "/" + "".join(s + "/" for s in segments[:-1])
    if (
        scheme != "aws"
        or not sep
        or not _ACCOUNT.fullmatch(account)
        or kind != "role"
        or not all(_NAME.fullmatch(s) for s in segments)
        or len(segments[-1]) > 64
        or len(path) > 512
    ):
        raise InvalidRequest(
            f"{resource!r} is not an AWS role resource; expected aws://<12-digit account>/role/<name> "
            "or aws://<account>/role/<path>/<name> with names of [A-Za-z0-9_+=,.@-]",
            code="invalid-resource",
        )
    return RoleRef(account=account, path=path, name=segments[-1], partition=partition)


def session_name_for(capability_id: str) -> str:
    """RoleSessionName is the capability id as is: 2..64 of [A-Za-z0-9_+=,.@-]."""
    if not (2 <= len(capability_id) <= 64 and _NAME.fullmatch(capability_id)):
        # Capability ids are the broker's own; one STS cannot carry is a broker bug, not input.
        raise ProviderMisconfigured(
            f"capability id {capability_id!r} is not a valid STS RoleSessionName (2..64 of [A-Za-z0-9_+=,.@-])"
        )
    return capability_id


def _short_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:8]


def source_identity_for(human: str) -> str:
    """The human as STS SourceIdentity: 2..64 of [A-Za-z0-9_+=,.@-], never starting "aws:".

    Accents are dropped ("José" -> "Jose"); any other character outside the set becomes "_"
    ("Jane Doe" -> "Jane_Doe", and "aws:x" -> "aws_x", so the reserved prefix cannot survive);
    shorter than 2 is padded with "_"; longer than 64 keeps 55 characters, "-", and 8 hex digits
    of the original's SHA-256, so two long names sharing a prefix stay distinct. The broker's
    audit records keep the exact human; this is what CloudTrail shows.
    """
    folded = "".join(c for c in unicodedata.normalize("NFKD", human) if not unicodedata.combining(c))
    out = "".join(c if c in _SOURCE_IDENTITY_OK else "_" for c in folded)
    if out.lower().startswith("aws:"):  # unreachable (":" is replaced) but the rule is STS's, so say it
        out = "aws_" + out[4:]
    if len(out) > SOURCE_IDENTITY_MAX:
        out = out[: SOURCE_IDENTITY_MAX - 9] + "-" + _short_hash(human)
    return out.ljust(2, "_")


def tag_value_for(value: str) -> str:
    """A session tag value: letters, digits, spaces and _.:/=+-@ only, at most 256 characters."""
    out = "".join(c if unicodedata.category(c)[0] in "LNZ" or c in _TAG_EXTRA else "_" for c in value)
    if len(out) > TAG_VALUE_MAX:
        out = out[: TAG_VALUE_MAX - 9] + "-" + _short_hash(value)
    return out


def session_policy_text(options: dict[str, Any]) -> str | None:
    """The access's `session_policy` as compact JSON, refused before any call if STS would refuse it."""
    policy = options.get("session_policy")
    if policy is None:
        return None
    if isinstance(policy, str):
        try:
            policy = json.loads(policy)
        except ValueError as exc:
            raise ProviderMisconfigured(f"session_policy is not JSON: {exc}") from None
    if not isinstance(policy, dict):
        raise ProviderMisconfigured("session_policy must be an IAM policy document (a mapping)")
    # ensure_ascii: STS takes only \u0020-\u00FF (plus tab/LF/CR) in a policy's plaintext.
    text = json.dumps(policy, separators=(",", ":"), ensure_ascii=True)
    if len(text) > SESSION_POLICY_MAX_CHARS:
        raise InvalidRequest(
            f"the session policy is {len(text)} characters as compact JSON; STS accepts at most "
            f"{SESSION_POLICY_MAX_CHARS}. Shorten it (wildcards, fewer statements) or put the "
            "permissions in the role itself",
            code="session-policy-too-large",
            size=len(text),
            limit=SESSION_POLICY_MAX_CHARS,
        )
    return text


def _max_duration_option(options: dict[str, Any]) -> int | None:
    value = options.get("max_duration")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < STS_MIN_DURATION:
        raise ProviderMisconfigured(
            f"max_duration must be a whole number of seconds >= {STS_MIN_DURATION} (STS's floor); got {value!r}"
        )
    return value


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, str) and value:
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return None


def _partition(region: str) -> str:
    try:
        return botocore.session.get_session().get_partition_for_region(region)
    except Exception:  # an unknown (new or private) region: the commercial partition is the best guess
        return "aws"


# --- the revocation policy document ---------------------------------------------------------


@dataclass
class RevocationPolicy:
    """The parsed `jit-broker-revoked-sessions` document. Statements it did not write are kept."""

    buckets: dict[int, set[str]] = field(default_factory=dict)  # bucket end (unix) -> aws:userid values
    issued_by: dict[int, int] = field(default_factory=dict)  # bucket end -> newest issue time in it
    fallback: tuple[int, int] | None = None  # (deny sessions issued before, until)
    foreign: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def parse(cls, document: dict[str, Any] | None) -> RevocationPolicy:
        out = cls()
        statements = (document or {}).get("Statement", [])
        for st in [statements] if isinstance(statements, dict) else statements:
            sid = st.get("Sid", "") if isinstance(st, dict) else ""
            cond = st.get("Condition", {}) if isinstance(st, dict) else {}
            if (m := _BUCKET_SID.fullmatch(sid)) and "aws:userid" in cond.get("StringEquals", {}):
                ids = cond["StringEquals"]["aws:userid"]
                if ids:
                    end = int(m.group(1))
                    out.buckets.setdefault(end, set()).update([ids] if isinstance(ids, str) else ids)
                    out.issued_by[end] = max(out.issued_by.get(end, 0), int(m.group(2)))
            elif (m := _FALLBACK_SID.fullmatch(sid)) and "aws:TokenIssueTime" in cond.get("DateLessThan", {}):
                out.fallback = (int(m.group(1)), int(m.group(2)))
            else:
                out.foreign.append(st)
        return out

    def merge(self, other: RevocationPolicy) -> None:
        """Union with what this process wrote last: IAM reads can lag a write by seconds."""
        for end, ids in other.buckets.items():
            self.buckets.setdefault(end, set()).update(ids)
            self.issued_by[end] = max(self.issued_by.get(end, 0), other.issued_by.get(end, 0))
        if other.fallback:
            mine = self.fallback or other.fallback
            self.fallback = (max(mine[0], other.fallback[0]), max(mine[1], other.fallback[1]))

    def covers(self, userid: str, expires: int, issued: int) -> bool:
        if self.fallback and issued < self.fallback[0] and expires <= self.fallback[1]:
            return True
        return any(userid in ids and end >= expires for end, ids in self.buckets.items())

    def add(self, userid: str, expires: int, issued: int) -> None:
        for ids in self.buckets.values():
            ids.discard(userid)  # it may sit in an earlier bucket from a recovered, shorter guess
        end = math.ceil(expires / BUCKET_SECONDS) * BUCKET_SECONDS
        self.buckets.setdefault(end, set()).add(userid)
        self.issued_by[end] = max(self.issued_by.get(end, 0), issued)
        self.buckets = {e: ids for e, ids in self.buckets.items() if ids}

    def prune(self, now: int) -> int:
        """Drop what has expired (with the clock grace); return how many entries went."""
        removed = 0
        for end in [e for e in self.buckets if e + CLOCK_GRACE_SECONDS <= now]:
            removed += len(self.buckets.pop(end))
            self.issued_by.pop(end, None)
        if self.fallback and self.fallback[1] + CLOCK_GRACE_SECONDS <= now:
            self.fallback = None
            removed += 1
        return removed

    def collapse(self) -> None:
        """The overflow fallback: one TokenIssueTime deny replaces every per-session statement.

        Every revoked session was issued no later than the newest issue time recorded, so
        "issued before that + 1 s" covers all of them (and, bluntly, the role's other sessions
        issued before it); it must last until the last of them expires.
        """
        before = max([*self.issued_by.values(), *([self.fallback[0] - 1] if self.fallback else [])]) + 1
        until = max([*self.buckets, *([self.fallback[1]] if self.fallback else [])])
        self.fallback = (before, until)
        self.buckets.clear()
        self.issued_by.clear()

    def is_empty(self) -> bool:
        return not self.buckets and not self.fallback and not self.foreign

    def document(self) -> dict[str, Any]:
        statements: list[dict[str, Any]] = [
            {
                "Sid": f"ExpiresAt{end}IssuedBy{self.issued_by.get(end, 0)}",
                "Effect": "Deny",
                "Action": "*",
                "Resource": "*",
                "Condition": {"StringEquals": {"aws:userid": sorted(ids)}},
            }
            for end, ids in sorted(self.buckets.items())
        ]
        if self.fallback:
            before, until = self.fallback
            statements.append({
                "Sid": f"IssuedBefore{before}ExpiresAt{until}",
                "Effect": "Deny",
                "Action": "*",
                "Resource": "*",
                "Condition": {"DateLessThan": {"aws:TokenIssueTime": _iso(datetime.fromtimestamp(before, UTC))}},
            })
        return {"Version": "2012-10-17", "Statement": statements + self.foreign}

    def text(self) -> str:
        return json.dumps(self.document(), separators=(",", ":"))

    def size(self) -> int:
        """What IAM counts against the 10,240 limit: characters that are not whitespace."""
        return len(re.sub(r"\s", "", self.text()))


# --- errors at the boundary -------------------------------------------------------------------


def _client_error(exc: ClientError, action: str) -> Exception:
    error = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    code = str(error.get("Code", "Unknown"))
    # AWS's messages name ARNs and parameters, never the credentials; clamp them anyway.
    message = f"AWS {action} failed: {code}: {str(error.get('Message', ''))[:300]}"
    details = {"aws_error": code, "aws_request_id": meta.get("RequestId", "")}
    if code in _UNAVAILABLE or int(meta.get("HTTPStatusCode") or 0) >= 500:
        return ProviderUnavailable(message, **details)
    if code in _MISCONFIGURED:
        return ProviderMisconfigured(message + " (the broker's own AWS credentials)", **details)
    return ProviderRejected(message, **details)


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """botocore's errors in, the broker's out; `from None` so no request or response rides along."""
    try:
        yield
    except ClientError as exc:
        raise _client_error(exc, action) from None
    except (NoCredentialsError, PartialCredentialsError):
        raise ProviderMisconfigured(
            f"AWS {action}: the broker has no AWS credentials (set AWS_* env, a profile, or a role)"
        ) from None
    except ParamValidationError as exc:
        raise ProviderMisconfigured(f"AWS {action}: invalid request: {str(exc)[:300]}") from None
    except BotoCoreError as exc:  # connection refused, timeouts, closed connections, DNS
        raise ProviderUnavailable(f"AWS {action}: {type(exc).__name__}: {str(exc)[:300]}") from None


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class _PolicyTooLarge(Exception):
    """IAM's LimitExceeded on PutRolePolicy, kept apart so revoke can fall back."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


# --- the provider ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Role:
    role_id: str
    max_session_seconds: int
    fetched: float


@dataclass(frozen=True)
class _Caller:
    account: str
    arn: str

    @property
    def is_role_session(self) -> bool:
        return ":assumed-role/" in self.arn


class AwsProvider:
    name: ClassVar[str] = "aws"

    def __init__(self, settings: Settings, *, session: boto3.session.Session | None = None) -> None:
        self._settings = settings
        self._partition = _partition(settings.aws_region)
        session = session or boto3.session.Session(region_name=settings.aws_region)
        config = Config(
            region_name=settings.aws_region,
            connect_timeout=settings.provider_timeout_seconds,
            read_timeout=settings.provider_timeout_seconds,
            # One retry: bounded at twice the timeout. A retried AssumeRole may mint a second
            # session under the same name; the per-name deny covers both.
            retries={"mode": "standard", "total_max_attempts": 2},
        )
        self._sts = session.client("sts", endpoint_url=settings.aws_endpoint_url, config=config)
        self._iam = session.client("iam", endpoint_url=settings.aws_endpoint_url, config=config)
        self._roles: dict[str, _Role] = {}
        self._caller: _Caller | None = None
        self._guard = threading.Lock()
        self._role_locks: dict[str, threading.Lock] = {}
        self._revoked_on: dict[str, RoleRef] = {}  # roles this process wrote a deny on: prune them
        self._written: dict[str, RevocationPolicy] = {}  # role ARN -> the document this process put last

    @classmethod
    def from_context(cls, ctx: ProviderContext) -> AwsProvider:
        session = boto3.session.Session(region_name=ctx.settings.aws_region)
        # Refuse at start rather than at the first request: a provider that cannot sign
        # anything is misconfigured, and readiness should not probe AWS to find that out.
        if session.get_credentials() is None:
            raise ProviderMisconfigured(
                "aws: no AWS credentials found for the broker (environment, shared config, web identity or instance role)"
            )
        return cls(ctx.settings, session=session)

    # --- bounds ----------------------------------------------------------------------------

    def ttl_bounds(self, resource: str, options: dict[str, Any]) -> TtlBounds:
        """900 s .. the role's MaxSessionDuration, capped at 1 h under role chaining and by `max_duration`."""
        ref = self._ref(resource)
        cap = _max_duration_option(options)
        most = self._role(ref).max_session_seconds
        if self._whoami().is_role_session:
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
        with _translated(f"sts:AssumeRole on {ref.arn}"):
            out = self._sts.assume_role(**params)

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
            "expiration": _iso(expires),
            "region": self._settings.aws_region,
        }
        handle = {
            "role_arn": ref.arn,
            "role_name": ref.name,
            "session_name": session_name,
            "access_key_id": creds["AccessKeyId"],
            "assumed_role_id": out["AssumedRoleUser"]["AssumedRoleId"],
            "expires_at": _iso(expires),
            "issued_at": _iso(issued),
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

    def revoke(self, target: RevokeTarget) -> None:
        """Deny this session (and only it) on its role until its credential would have expired."""
        ref = self._ref(target.resource)
        handle = target.handle or {}
        session_name = handle.get("session_name") or session_name_for(target.capability_id)
        now = datetime.now(UTC)
        # The later of AWS's own expiry (from the mint) and the lease's: a recovered handle has only the latter.
        expires = max(t for t in (_parse_time(handle.get("expires_at")), _parse_time(target.expires_at)) if t)
        if expires + timedelta(seconds=CLOCK_GRACE_SECONDS) <= now:
            return  # expired on its own: nothing left to deny
        userid = handle.get("assumed_role_id") or f"{self._role(ref).role_id}:{session_name}"
        issued_at = _parse_time(handle.get("issued_at")) or now + timedelta(seconds=CLOCK_GRACE_SECONDS)
        exp_s, issued_s = math.ceil(expires.timestamp()), math.ceil(issued_at.timestamp())

        with self._role_lock(ref):
            self._revoked_on[ref.arn] = ref
            policy = self._read_revocations(ref)
            changed = policy.prune(math.floor(now.timestamp())) > 0
            if policy.covers(userid, exp_s, issued_s):
                if changed:
                    self._store(ref, policy)
                return
            policy.add(userid, exp_s, issued_s)
            collapsed = policy.size() > INLINE_POLICY_MAX_CHARS
            if collapsed:
                policy.collapse()
            try:
                self._store(ref, policy)
            except _PolicyTooLarge as exc:
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
                    _iso(datetime.fromtimestamp(policy.fallback[0], UTC)) if policy.fallback else "?",
                )
            log.info("denied session %s on %s until %s", userid, ref.arn, _iso(expires))

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
            except _PolicyTooLarge as exc:
                log.warning("could not prune revocations on %s: %s", ref.arn, exc.error)
        return removed

    def _read_revocations(self, ref: RoleRef) -> RevocationPolicy:
        """The policy as IAM has it (other replicas' entries), united with this process's last write."""
        with _translated(f"iam:GetRolePolicy on {ref.arn}"):
            try:
                raw = self._iam.get_role_policy(RoleName=ref.name, PolicyName=REVOCATION_POLICY_NAME)["PolicyDocument"]
            except ClientError as exc:
                if _error_code(exc) != "NoSuchEntity":
                    raise
                raw = None  # no deny yet (a missing role shows on write)
        policy = RevocationPolicy.parse(json.loads(raw) if isinstance(raw, str) else raw)
        if ref.arn in self._written:
            policy.merge(self._written[ref.arn])
        return policy

    def _store(self, ref: RoleRef, policy: RevocationPolicy) -> None:
        """Put the policy, or delete it when empty. Raises _PolicyTooLarge on IAM's LimitExceeded."""
        action = f"iam:PutRolePolicy on {ref.arn}"
        with _translated(action):
            try:
                if policy.is_empty():
                    try:
                        self._iam.delete_role_policy(RoleName=ref.name, PolicyName=REVOCATION_POLICY_NAME)
                    except ClientError as exc:
                        if _error_code(exc) != "NoSuchEntity":  # already gone is what we wanted
                            raise
                else:
                    self._iam.put_role_policy(
                        RoleName=ref.name, PolicyName=REVOCATION_POLICY_NAME, PolicyDocument=policy.text()
                    )
                self._written[ref.arn] = copy.deepcopy(policy)
            except ClientError as exc:
                if _error_code(exc) == "LimitExceeded":
                    raise _PolicyTooLarge(_client_error(exc, action)) from None
                if _error_code(exc) == "NoSuchEntity":
                    # Not "revoked on hope": with the role deleted, a resource policy that named
                    # its unique id might still honour the session. Pending until it expires.
                    raise ProviderRejected(
                        f"role {ref.arn} no longer exists, so the revocation deny cannot be attached; "
                        "the lease stays pending until the credential's own expiry",
                        aws_error="NoSuchEntity",
                    ) from None
                raise

    # --- crash recovery ------------------------------------------------------------------------

    def find_by_capability(self, capability_id: str, resource: str | None = None) -> dict[str, Any]:
        """The handle of a session that may have been minted before a crash.

        STS has no list of live sessions, but none is needed: the session name is the
        capability id, so the handle follows from the resource. It is returned whether or not
        AssumeRole got through; revoking a session that never existed costs one deny entry
        that is pruned with the rest.
        """
        if resource is None:
            raise ProviderMisconfigured("the aws provider needs the lease's resource to find a capability's session")
        ref = self._ref(resource)
        session_name = session_name_for(capability_id)
        return {
            "role_arn": ref.arn,
            "role_name": ref.name,
            "session_name": session_name,
            "access_key_id": None,
            "assumed_role_id": f"{self._role(ref).role_id}:{session_name}",
            "expires_at": None,
            "issued_at": None,
            "recovered": True,
        }

    # --- health ------------------------------------------------------------------------------

    def health(self) -> ProviderHealth:
        try:
            with _translated("sts:GetCallerIdentity"):
                out = self._sts.get_caller_identity()
        except Exception as exc:  # health never raises
            return ProviderHealth(ok=False, detail=getattr(exc, "message", type(exc).__name__))
        self._caller = _Caller(account=out["Account"], arn=out["Arn"])
        return ProviderHealth(ok=True, detail=f"sts reachable as {out['Arn']}")

    # --- lookups -------------------------------------------------------------------------------

    def _ref(self, resource: str) -> RoleRef:
        return parse_role_resource(resource, self._partition)

    def _whoami(self) -> _Caller:
        if self._caller is None:
            with _translated("sts:GetCallerIdentity"):
                out = self._sts.get_caller_identity()
            self._caller = _Caller(account=out["Account"], arn=out["Arn"])
        return self._caller

    def _role(self, ref: RoleRef) -> _Role:
        cached = self._roles.get(ref.arn)
        if cached and time.monotonic() - cached.fetched < ROLE_CACHE_SECONDS:
            return cached
        caller = self._whoami()
        if caller.account != ref.account:
            raise ProviderMisconfigured(
                f"{ref.arn} is in account {ref.account}, the broker's identity in {caller.account}: "
                "the broker can only revoke (PutRolePolicy) on roles of its own account, so it does not mint there"
            )
        with _translated(f"iam:GetRole on {ref.arn}"):
            role = self._iam.get_role(RoleName=ref.name)["Role"]
        if role["Arn"] != ref.arn:  # same name, other path: not the role the policy names
            raise ProviderMisconfigured(f"role {ref.name!r} is {role['Arn']}, not {ref.arn}")
        found = _Role(
            role_id=role["RoleId"],
            max_session_seconds=int(role.get("MaxSessionDuration", 3600)),
            fetched=time.monotonic(),
        )
        self._roles[ref.arn] = found
        return found

    def _role_lock(self, ref: RoleRef) -> threading.Lock:
        with self._guard:
            return self._role_locks.setdefault(ref.arn, threading.Lock())
