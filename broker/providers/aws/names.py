"""Names and values AWS accepts: role resources, session names, SourceIdentity, tags, session policies."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import botocore.session

from broker.errors import InvalidRequest, ProviderMisconfigured
from broker.policy.resources import resource_problem

REVOCATION_POLICY_NAME = "jit-broker-revoked-sessions"
STS_MIN_DURATION = 900  # AssumeRole's floor
CHAINED_MAX_DURATION = 3600  # a role session assuming another role (role chaining) gets at most 1 h
SESSION_POLICY_MAX_CHARS = 2048  # plaintext limit of an inline session policy
INLINE_POLICY_MAX_CHARS = 10240  # all inline policies of a role together, whitespace not counted
TAG_VALUE_MAX = 256
SOURCE_IDENTITY_MAX = 64
# Broker and AWS clocks differ; a deny outlives its credential by this much, and a recovered
# session whose issue time is unknown is assumed issued up to this far in the future.
CLOCK_GRACE_SECONDS = 300
ROLE_CACHE_SECONDS = 300  # MaxSessionDuration can be edited; re-read it every 5 min

_NAME = re.compile(r"[\w+=,.@-]+", re.ASCII)  # IAM role names, path segments, STS session names
_ACCOUNT = re.compile(r"\d{12}")
_SOURCE_IDENTITY_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+=,.@-")
_TAG_EXTRA = frozenset("_.:/=+-@")  # besides letters, digits and spaces ([\p{L}\p{Z}\p{N}_.:/=+\-@])


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
        or resource_problem(resource) is not None  # the canonical form the policy decided on
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


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, str) and value:
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return None


def _partition(region: str) -> str:
    try:
        return str(botocore.session.get_session().get_partition_for_region(region))
    except Exception:  # noqa: BLE001  # an unknown (new or private) region: the commercial partition is the best guess
        return "aws"
