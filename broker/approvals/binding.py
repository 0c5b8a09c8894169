"""What an approval is: its statuses, the exact request it is bound to (`Binding`, hashed), the
message that names that binding to a person, and the status as read at a given time (expiry is
read, not swept).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.approvals import summary
from broker.models import AnySession, Approval, SessionRow

STATUSES = ("pending", "approved", "denied", "expired", "used")
LIVE = ("pending", "approved")
MAX_PARAMETERS_IN_MESSAGE = 240


@dataclass(frozen=True)
class Binding:
    """What an approval is bound to. Any field changed is another request."""

    session_id: str
    resource: str
    access: str
    ttl_seconds: int | None  # as requested (None: the tier's maximum)
    tool: str | None
    parameters: dict[str, Any] | None

    def request_hash(self) -> str:
        return summary.request_hash({"session_id": self.session_id, "resource": self.resource, "access": self.access,
                                     "ttl_seconds": self.ttl_seconds, "tool": self.tool,
                                     "parameters": self.parameters})


def binding_message(session: SessionRow, binding: Binding, tier: str, granted_ttl: int | None, purpose: str) -> str:
    ttl = f"{granted_ttl}s" if granted_ttl else "the tier's maximum"
    text = (f"{session.agent} (task {session.task_id}, delegated by {session.human}) asks {binding.access} on "
            f"{binding.resource} [{tier}] for {ttl}")
    if binding.tool:
        text += f" via {binding.tool}"
    if binding.parameters:
        params = json.dumps(binding.parameters, sort_keys=True, separators=(",", ":"))
        if len(params) > MAX_PARAMETERS_IN_MESSAGE:
            params = params[:MAX_PARAMETERS_IN_MESSAGE] + "..."
        text += f" with {params}"
    return f"{text}; purpose: {purpose[:200]}. Binding {summary.binding_code(binding.request_hash())}."


def effective_status(approval: Approval, session: AnySession | None, now: datetime) -> str:
    """Expiry is read, not swept: a live approval past its time (or its session's) is expired."""
    if approval.status in LIVE and (approval.expires_at <= now or session is None or session.status != "active"
                                    or session.expires_at <= now):
        return "expired"
    return approval.status

