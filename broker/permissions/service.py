"""Asking the live source for one request, before the pure evaluator runs (and outside any lock)."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlmodel import select

from broker.db import transaction
from broker.models import SessionRow
from broker.permissions.registry import LivePermissions
from broker.policy import CompiledPolicy, LivePermission


def needs_live_answer(policy: CompiledPolicy, resource: str, access: str) -> bool:
    rule = policy.match_resource(resource)
    return rule is not None and rule.human_permission is not None and access in rule.access


def for_session(engine: Engine, permissions: LivePermissions, policy: CompiledPolicy, session_id: str,
                resource: str, access: str) -> LivePermission | None:
    """The live source's answer for the session's human, or None when the rule names no source.

    Called before the decision's transaction: a backend call (up to the provider timeout) must
    never be made while the session row is locked, or one slow GitHub would stall the session.
    """
    if not needs_live_answer(policy, resource, access):
        return None
    with transaction(engine) as db:
        human = db.exec(select(SessionRow.human).where(SessionRow.id == session_id)).first()
    if human is None:
        return None  # the decision refuses the missing session itself
    # The session pays for its backend calls: one agent cannot spend the source's quota.
    return permissions.consult(policy, human, resource, access, caller=f"session:{session_id}")
