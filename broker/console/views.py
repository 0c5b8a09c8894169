"""What the console's pages show, computed from what the services return: no authorisation
here (the services decide who sees what), only presentation."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from broker.approvals.summary import binding_code, canonical_parameters, sentence
from broker.audit.verification import RecordCheck
from broker.config import Settings
from broker.display import hidden_characters
from broker.models import AuditRecord

_REPO = r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+"
ISSUE_REF = re.compile(rf"^(?P<repo>{_REPO})#(?P<issue>\d+)$", re.ASCII)
URL_LABELS = ("task_url", "issue_url", "url")

WHY = {
    "approval-required": "the tier needs a person's approval",
    "escalation-requires-approval": "escalation: the session already holds a merge_deploy or secret capability",
    "break-glass-required": "break-glass: a destructive access, single use, reviewed after use",
}


def task_link(settings: Settings, task_id: str | None, repository: str | None, labels: dict[str, Any]) -> str | None:
    """The orchestrator's page for the task: a label with an http(s) URL, else a repository and
    an issue number put into BROKER_CONSOLE_ISSUE_URL_TEMPLATE. Nothing else becomes a link."""
    for key in URL_LABELS:
        value = labels.get(key)
        if (isinstance(value, str) and value.startswith(("https://", "http://")) and " " not in value
                and not hidden_characters(value)):  # a link whose text could hide where it goes is no link
            return value
    found = ISSUE_REF.match(task_id or "")
    repo, issue = (found["repo"], found["issue"]) if found else (
        repository or labels.get("repository"), labels.get("issue_number") or labels.get("issue"))
    if repo and issue and str(issue).isascii() and str(issue).isdigit() and re.fullmatch(_REPO, str(repo), re.ASCII):
        return settings.console_issue_url_template.format(repository=repo, issue=issue)
    return None


def _aware(value: Any) -> datetime | None:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None


def card(settings: Settings, approval: dict[str, Any], now: datetime) -> dict[str, Any]:
    """One approval as its card shows it."""
    expires = _aware(approval["expires_at"])
    decision = approval.get("policy_decision") or {}
    display = approval.get("display") or {}
    rule = decision.get("matched_rule")
    if rule and decision.get("matched_line"):
        rule = f"{rule} (line {decision['matched_line']})"
    return {
        **approval,
        "task_url": task_link(settings, approval.get("task_id"), approval.get("repository"), approval.get("labels") or {}),
        "seconds_left": max(0, int((expires - now).total_seconds())) if expires else 0,
        "why": WHY.get(approval["reason"], approval["reason"]),
        "rule": rule,
        "layer": decision.get("layer"),
        "policy_version": (decision.get("policy_version") or "")[:19],
        "binding_code": binding_code(approval.get("request_hash") or ""),
        "sentence": sentence(approval, shown=str),  # marked by the template's `visible` filter
        "parameters_canonical": canonical_parameters(approval.get("parameters")),
        "hidden": display.get("hidden_characters") or [],
        "warning": display.get("warning"),
    }


@dataclass
class Entry:
    seq: int
    timestamp: str
    type: str
    outcome: str
    title: str
    lines: list[str] = field(default_factory=list)
    actor: str | None = None
    hash: str = ""
    prev_hash: str = ""
    verified: bool = True
    problem: str | None = None
    tone: str = "info"  # info | good | warn | bad


def _target(request: dict[str, Any]) -> str:
    access, resource = request.get("access"), request.get("resource")
    return f"{access} on {resource}" if access else str(resource or "")


def entry(row: AuditRecord, check: RecordCheck | None) -> Entry:
    """One audit record in words: what happened, who did it, and the policy's part in it."""
    body = json.loads(row.record)
    request = body.get("request") or {}
    decision = body.get("policy_decision") or {}
    grant = body.get("jit_grant") or {}
    detail = body.get("detail") or {}
    kind = body.get("type", row.type)
    actor = body.get("actor") or request.get("actor")  # top-level since the typed record; older ones kept it in request
    lines: list[str] = []
    tone = "info"
    if kind == "session.created":
        title = f"Session provisioned for {body.get('human_principal')} and agent {(body.get('agent') or {}).get('id')}"
        scope = detail.get("scope") or []
        lines += [f"scope: {s.get('resource')} = {', '.join(s.get('access') or [])}" for s in scope]
    elif kind == "capability.denied":
        title, tone = f"Denied: {_target(request)}", "bad"
        lines.append(f"layer: {decision.get('layer') or 'policy'}, reason: {decision.get('reason')}")
    elif kind == "capability.pending":
        title, tone = f"Waiting for approval: {_target(request)}", "warn"
        lines.append(f"layer: {decision.get('layer') or 'tier'}, reason: {decision.get('reason')}")
        lines.append(f"approval: {grant.get('approval_id')}")
    elif kind == "approval.decided":
        verdict = {"approved": "Approved", "denied": "Denied", "approval_recorded": "Approval recorded"}.get(
            body.get("outcome", ""), body.get("outcome", ""))
        title = f"{verdict} by {detail.get('decided_by')}: {_target(request)}"
        tone = "good" if body.get("outcome") == "approved" else "bad" if body.get("outcome") == "denied" else "info"
        if detail.get("reason"):
            lines.append(f"reason: {detail['reason']}")
        lines.append(f"approvals {detail.get('approvals')} of {detail.get('required')}; approval {detail.get('approval_id')}")
    elif kind == "capability.minted":
        title, tone = f"Minted: {_target(request)}", "good"
        lines.append(f"capability {grant.get('capability_id')} via {grant.get('provider')} for {grant.get('ttl_seconds')} s")
        if grant.get("credential_fingerprint") or grant.get("fingerprint"):
            lines.append(f"credential fingerprint {grant.get('credential_fingerprint') or grant.get('fingerprint')}")
        if decision.get("approval"):
            lines.append(f"under approval {decision['approval'].get('approval_id')} by {decision['approval'].get('approved_by')}")
    elif kind in ("capability.revoked", "capability.expired", "capability.revoke_failed", "capability.revoke_pending"):
        word = {"capability.revoked": "Revoked", "capability.expired": "Expired",
                "capability.revoke_failed": "Revoke failed (retrying)", "capability.revoke_pending": "Revoke pending"}[kind]
        title = f"{word}: {_target(request)}"
        tone = "warn" if "fail" in kind or "pending" in kind else "info"
        lines.append(f"receipt: capability {grant.get('capability_id')} is {grant.get('status')} ({request.get('reason')})")
        if detail.get("note"):
            lines.append(str(detail["note"]))
    elif kind == "session.ended":
        title = f"Session ended ({detail.get('reason')})"
    else:
        title = f"{kind}: {body.get('outcome')}"
        if request.get("resource"):
            lines.append(_target(request))
    if decision.get("matched_rule"):
        lines.append(f"rule: {decision['matched_rule']} (policy {str(decision.get('policy_version', ''))[:19]})")
    return Entry(seq=row.seq, timestamp=row.timestamp, type=kind, outcome=row.outcome, title=title, lines=lines,
                 actor=actor, hash=row.hash, prev_hash=row.prev_hash, verified=check.ok if check else False,
                 problem=check.problem if check else "not checked", tone=tone)


def count(n: int, one: str, many: str) -> str:
    """`1 capability`, `0 capabilities`, `3 capabilities`."""
    return f"{n} {one if n == 1 else many}"
