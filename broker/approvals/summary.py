"""What a person deciding an approval is shown: one sentence saying what approving lets the agent
do, for how long and how many times; the binding code and the canonical JSON of the parameters
(exactly what the request hash covers); and every agent-controlled field rendered by
`broker.display.visible`. The console, the CLI and the notifications all read this one block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime
from typing import Any

from broker.audit.chain import canonical_json
from broker.display import hidden_characters, visible

TOOL_SCHEME = "tool://"


def binding_code(request_hash: str) -> str:
    """Eight hex digits of the binding, grouped: what an approver compares with the agent's screen."""
    digits = request_hash.removeprefix("sha256:")[:8].upper()
    return f"{digits[:4]}-{digits[4:]}" if digits else ""


def request_hash(body: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()


def canonical_parameters(parameters: dict[str, Any] | None) -> str | None:
    """The parameters exactly as the request hash reads them (sorted keys, no spaces, UTF-8)."""
    return None if parameters is None else canonical_json(parameters)


def duration_words(seconds: int) -> str:
    if seconds <= 0:
        return "0 s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours} h" if hours else "", f"{minutes} min" if minutes else "", f"{secs} s" if secs else ""]
    return " ".join(p for p in parts if p)


def is_tool_call(approval: dict[str, Any]) -> bool:
    """Raised by the tool-call gate (resource `tool://<name>`, no credential, no ttl)."""
    return str(approval.get("resource") or "").startswith(TOOL_SCHEME) and not approval.get("ttl_seconds")


def _seconds(start: Any, end: Any) -> int:
    if isinstance(start, datetime) and isinstance(end, datetime):
        return max(0, int((end - start).total_seconds()))
    return 0


def sentence(approval: dict[str, Any], shown: Callable[[str], str] = visible) -> str:
    """'Approving lets claude-code mint one `deploy` credential for jwt://payments-api, valid at
    most 5 min, once.' Every agent-controlled word in it passes through `shown` (an HTML surface
    passes `str` and marks the whole sentence itself)."""
    agent = shown(str(approval.get("agent") or "the agent"))
    human = shown(str(approval.get("human") or ""))
    on_behalf = f" (acting for {human})" if human else ""
    window = _seconds(approval.get("created_at"), approval.get("expires_at"))
    within = f"within {duration_words(window)} of approval" if window else "before the approval expires"
    if is_tool_call(approval):
        tool = shown(str(approval.get("tool") or approval["resource"].removeprefix(TOOL_SCHEME)))
        text = (f"Approving lets {agent}{on_behalf} run one `{tool}` tool call with exactly the input shown, "
                f"once, {within}.")
    else:
        ttl = int(approval.get("ttl_seconds") or 0)
        valid = f"valid at most {duration_words(ttl)}" if ttl else "valid up to the tier's maximum"
        tool = f" via `{shown(str(approval['tool']))}`" if approval.get("tool") else ""
        params = " with exactly the parameters shown" if approval.get("parameters") else ""
        text = (f"Approving lets {agent}{on_behalf} mint one `{shown(str(approval['access']))}` credential for "
                f"{shown(str(approval['resource']))}{tool}{params}, {valid}, once, {within}.")
    needed = int(approval.get("min_approvals") or 1)
    if needed > 1:
        text += f" It needs {needed} distinct approvers."
    return text


# Fields an agent or orchestrator wrote: each is rendered visibly and scanned for hidden characters.
AGENT_TEXT = ("purpose", "tool", "resource", "access", "task_id", "agent", "human", "repository", "binding_message",
              "justification")


def display(approval: dict[str, Any]) -> dict[str, Any]:
    """The `display` block of an approval view (`approval` is the view without it)."""
    params = canonical_parameters(approval.get("parameters"))
    labels = approval.get("labels") or {}
    hidden = hidden_characters([approval.get(f) for f in AGENT_TEXT] + [approval.get("parameters"), labels])
    votes = [{"approver": visible(v["approver"]), "decision": v["decision"],
              "reason": visible(v["reason"]) if v.get("reason") else None} for v in approval.get("approvals") or []]
    block: dict[str, Any] = {f: visible(approval[f]) if isinstance(approval.get(f), str) else None for f in AGENT_TEXT}
    block.update({
        "sentence": sentence(approval),
        "binding_code": binding_code(approval.get("request_hash") or ""),
        "request_hash": approval.get("request_hash"),
        "parameters_canonical": visible(params) if params is not None else None,
        "labels": {visible(k): visible(str(v)) for k, v in labels.items()},
        "approvals": votes,
        "hidden_characters": hidden,
        "warning": (f"This request contains {len(hidden)} kind(s) of invisible, direction-changing or look-alike "
                    f"character ({', '.join(hidden[:12])}{', ...' if len(hidden) > 12 else ''}); each is shown "
                    f"as \u27e6U+XXXX\u27e7 where it stands. Read the request with care.") if hidden else None,
    })
    return block
