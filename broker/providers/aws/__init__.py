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

from broker.providers.aws.names import (
    CHAINED_MAX_DURATION,
    INLINE_POLICY_MAX_CHARS,
    REVOCATION_POLICY_NAME,
    SESSION_POLICY_MAX_CHARS,
    SOURCE_IDENTITY_MAX,
    STS_MIN_DURATION,
    TAG_VALUE_MAX,
    RoleRef,
    parse_role_resource,
    session_name_for,
    session_policy_text,
    source_identity_for,
    tag_value_for,
)
from broker.providers.aws.provider import AwsProvider
from broker.providers.aws.revocations import BUCKET_SECONDS, RevocationPolicy

__all__ = [
    "BUCKET_SECONDS",
    "CHAINED_MAX_DURATION",
    "INLINE_POLICY_MAX_CHARS",
    "REVOCATION_POLICY_NAME",
    "SESSION_POLICY_MAX_CHARS",
    "SOURCE_IDENTITY_MAX",
    "STS_MIN_DURATION",
    "TAG_VALUE_MAX",
    "AwsProvider",
    "RevocationPolicy",
    "RoleRef",
    "parse_role_resource",
    "session_name_for",
    "session_policy_text",
    "source_identity_for",
    "tag_value_for",
]
