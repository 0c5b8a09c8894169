"""Builds permission sources from the `jit_broker.permission_sources` entry points, and asks them.

`LivePermissions.consult` is the one place the broker asks a live source: it finds the rule's
`human_permission`, builds the query, goes through the cache, and turns whatever happens
(an answer, an exception, a source that was never built) into a `LivePermission` the pure
evaluator reads. A failure is `unknown`, never `allow`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from broker.errors import ConfigError
from broker.metrics import PERMISSION_ANSWERS
from broker.permissions.base import UNKNOWN, PermissionQuery, PermissionSource, SourceAnswer
from broker.permissions.budget import LiveCheckBudget
from broker.permissions.cache import AnswerCache
from broker.plugins import PERMISSION_SOURCES, PluginContext, Unconfigured, build
from broker.policy import CompiledPolicy, LivePermission

log = logging.getLogger("broker.permissions")
MAX_EVIDENCE_TEXT = 500  # characters of one string a backend said
MAX_EVIDENCE_ITEMS = 50  # entries of one list or mapping (policies, groups)


class UnconfiguredSource(Unconfigured, PermissionSource):
    """The placeholder for a source that cannot start (embedded default only): every answer is
    `unknown` with the reason, so rules that name it fail closed."""

    name: ClassVar[str] = "unconfigured"

    @classmethod
    def from_context(cls, ctx: PluginContext) -> UnconfiguredSource:
        raise ConfigError("the placeholder source is built by the registry, not from an entry point")

    def check(self, query: PermissionQuery) -> SourceAnswer:
        return SourceAnswer.unknown(f"source {self.plugin_name} is not configured: {self.reason}")


def build_sources(names: set[str] | frozenset[str], ctx: PluginContext, *,
                  tolerate_missing: bool) -> dict[str, PermissionSource]:
    return build(PERMISSION_SOURCES, PermissionSource, names, ctx, UnconfiguredSource if tolerate_missing else None)


class LivePermissions:
    """The built sources and their shared answer cache."""

    def __init__(self, sources: Mapping[str, PermissionSource], cache_seconds: float,
                 budget: LiveCheckBudget | None = None) -> None:
        self.sources = dict(sources)
        self.cache = AnswerCache(cache_seconds)
        self.budget = budget or LiveCheckBudget(0, 60.0)  # none: unbudgeted (tests, tools)

    def consult(self, policy: CompiledPolicy, human: str, resource: str, access: str, *, fresh: bool = False,
                claims: Mapping[str, Any] | None = None, caller: str | None = None) -> LivePermission | None:
        """The live answer for this request, or None when its rule names no live source.

        `caller` ("session:<id>", "human:<email>" ...) pays for a backend call out of its budget
        (broker/permissions/budget.py) and gets LiveCheckBudgetExceeded when it is spent; the
        broker's own re-check passes none (it is bounded by its interval)."""
        rule = policy.match_resource(resource)
        if rule is None or rule.human_permission is None or access not in rule.access:
            return None
        live = rule.human_permission
        source = self.sources.get(live.source)
        if source is None:
            # A reloaded policy naming a source this process never built: deny until restarted.
            return LivePermission(live.source, UNKNOWN, {"summary": f"source {live.source} is not running; restart the broker"})
        query = PermissionQuery(
            human=human, resource=resource, access=access, require=live.require.get(access, frozenset()),
            options=live.options, identity=policy.identity_of(human), claims=dict(claims or {}),
        )
        budget = self.budget
        admit = (lambda: budget.take(caller)) if caller is not None and budget.enabled else None
        answer, cached = self.cache.get_or_fetch(_key(live.source, query), lambda: _ask(source, live.source, query),
                                                 fresh=fresh, admit=admit)
        PERMISSION_ANSWERS.labels(live.source, answer.verdict, "true" if cached else "false").inc()
        return LivePermission(live.source, answer.verdict, dict(answer.evidence), cached)

    def close(self) -> None:
        for source in self.sources.values():
            try:
                source.close()
            except Exception:  # closing is best effort
                log.exception("closing permission source %s failed", source.name)


def _key(source: str, q: PermissionQuery) -> tuple[Any, ...]:
    # Everything the answer depends on: the mapping and the identities too, so a policy reload
    # that changes them is never answered from the old entry.
    return (source, q.human, q.resource, q.access, tuple(sorted(q.require)),
            json.dumps(dict(q.options), sort_keys=True, default=str), tuple(sorted(q.identity.items())),
            json.dumps(dict(q.claims), sort_keys=True, default=str))


def _ask(source: PermissionSource, name: str, query: PermissionQuery) -> SourceAnswer:
    try:
        answer = source.check(query)
    except Exception as exc:  # noqa: BLE001  # a source that raises has not said yes: fail closed
        log.warning("permission source %s failed for %s on %s: %s", name, query.human, query.resource,
                    type(exc).__name__)
        message = getattr(exc, "message", None) or type(exc).__name__
        return SourceAnswer.unknown(f"{name} failed: {message}"[:300], error=getattr(exc, "code", type(exc).__name__))
    if answer.verdict not in ("allow", "deny", "unknown"):
        return SourceAnswer.unknown(f"{name} answered {answer.verdict!r}, which means nothing here")
    return SourceAnswer(answer.verdict, _bounded(answer.evidence))


def _bounded(value: Any, depth: int = 0) -> Any:
    """Evidence goes into every decision's audit record: what a backend said is kept, but bounded."""
    if isinstance(value, str):
        return value[:MAX_EVIDENCE_TEXT]
    if isinstance(value, Mapping) and depth < 3:
        return {str(k)[:64]: _bounded(v, depth + 1) for k, v in list(value.items())[:MAX_EVIDENCE_ITEMS]}
    if isinstance(value, (list, tuple, set, frozenset)) and depth < 3:
        return [_bounded(v, depth + 1) for v in list(value)[:MAX_EVIDENCE_ITEMS]]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)[:MAX_EVIDENCE_TEXT]
