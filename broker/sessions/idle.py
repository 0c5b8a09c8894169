"""A session's idle timeout (stall): what it is at provision, and how finely its liveness is written.

The rest of stall, noting requests and ending stalled sessions, is `broker/sessions/liveness.py`.
"""

from __future__ import annotations

from broker.errors import InvalidRequest
from broker.policy.compiled import CompiledPolicy
from broker.runtime import Broker

CLAIM = "idle"  # the session token's claim: the idle timeout in seconds


def idle_timeout_for(policy: CompiledPolicy, requested: int | None) -> int | None:
    """The idle timeout a session gets at provision: its own, bounded by the policy, else the
    policy's default; None: the session never stalls."""
    rules = policy.liveness
    if requested is None:
        return rules.idle_timeout if rules is not None else None
    bound = None if rules is None else (rules.max_idle_timeout or rules.idle_timeout)
    if bound is not None and requested > bound:
        raise InvalidRequest(f"idle_timeout_seconds exceeds the policy's maximum idle timeout ({bound})",
                             code="idle-timeout-out-of-bounds")
    return requested


def granularity(broker: Broker, timeout: int) -> int:
    return max(1, min(broker.settings.liveness_granularity_seconds, timeout // 4))
