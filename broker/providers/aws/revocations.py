"""The inline deny policy that revokes role sessions: per-session entries in expiry buckets, pruned later."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from broker.providers.aws.names import CLOCK_GRACE_SECONDS
from broker.times import rfc3339

# --- the revocation policy document ---------------------------------------------------------


BUCKET_SECONDS = 900  # revoked sessions expiring within the same 15 min share one statement
_BUCKET_SID = re.compile(r"ExpiresAt(\d+)IssuedBy(\d+)")
_FALLBACK_SID = re.compile(r"IssuedBefore(\d+)ExpiresAt(\d+)")

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
                "Condition": {"DateLessThan": {"aws:TokenIssueTime": rfc3339(datetime.fromtimestamp(before, UTC))}},
            })
        return {"Version": "2012-10-17", "Statement": statements + self.foreign}

    def text(self) -> str:
        return json.dumps(self.document(), separators=(",", ":"))

    def size(self) -> int:
        """What IAM counts against the 10,240 limit: characters that are not whitespace."""
        return len(re.sub(r"\s", "", self.text()))
