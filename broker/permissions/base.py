"""The PermissionSource protocol: what a live backend says the delegating human may do.

The policy file's grants drift from the truth; a permission source asks the backend that
holds the truth (GitHub's collaborators, OpenBao's identity store) whether the human really
holds an access, so the human layer allows only where the grants AND the source allow.

A source is asked one `PermissionQuery`: this human, this resource, this access, the answers
of the backend that allow it (the rule's `require[access]`), the rule's options, and who the
human is at the backend (the policy's `humans.<email>.github_login` ..., verified identity
claims). It answers a `SourceAnswer`:

- `allow`: the backend says the human holds one of the required answers;
- `deny`: the backend says they do not (or the human has no identity there);
- `unknown`: the backend could not be asked or its answer could not be read. The broker then
  denies with `human-permission-unavailable` unless the rule says `on_unavailable: allow`.

`evidence` says what the backend said (login, role, policies, the error), for the decision, the
audit record and `policy explain`; it never holds a secret. A source only reads: it never
changes anything at the backend and never hands a credential to anyone.

A deployment adds a source by installing a package with an entry point in the
`jit_broker.permission_sources` group whose target subclasses `PermissionSource`: a plugin like
every provider (broker/plugins.py: built by `from_context(PluginContext)`, with its settings, a
client shared with its backend's provider, `health` and `close`). The sources shipped live in
their backend's provider package (broker/providers/github/source.py, vault/source.py).
Every method a source may have is declared here and on `Plugin`; nothing else is ever looked up on it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.plugins import Plugin, PluginContext, PluginHealth

ALLOW, DENY, UNKNOWN = "allow", "deny", "unknown"


@dataclass(frozen=True)
class PermissionQuery:
    """One question to a source."""

    human: str  # the delegating human's principal (email), as on the session
    resource: str  # full URI, e.g. "github://acme/widgets"
    access: str  # access name on the resource rule, e.g. "write"
    require: frozenset[str]  # backend answers that allow this access (the rule's require[access])
    options: Mapping[str, Any] = field(default_factory=dict)  # the rule's human_permission.options
    identity: Mapping[str, str] = field(default_factory=dict)  # policy mapping: github_login, openbao_entity ...
    claims: Mapping[str, Any] = field(default_factory=dict)  # identity claims the broker verified (OIDC)


@dataclass(frozen=True)
class SourceAnswer:
    verdict: str  # allow | deny | unknown
    evidence: Mapping[str, Any]  # what the backend said; "summary" is one readable line

    @classmethod
    def unknown(cls, summary: str, **evidence: Any) -> SourceAnswer:
        return cls(UNKNOWN, {"summary": summary, **evidence})

    @classmethod
    def deny(cls, summary: str, **evidence: Any) -> SourceAnswer:
        return cls(DENY, {"summary": summary, **evidence})


def judge(held: Iterable[str], query: PermissionQuery, summary: str, **evidence: Any) -> SourceAnswer:
    """The mapping every role-style source shares: allow when the backend's answers for the human
    (roles, policy names) meet the rule's required answers for this access. Case-insensitive:
    GitHub and OpenBao both treat these names so."""
    have = {h.lower() for h in held if h}
    want = {r.lower() for r in query.require}
    matched = sorted(have & want)
    verdict = ALLOW if matched else DENY
    return SourceAnswer(verdict, {"summary": summary, **evidence, "held": sorted(have), "matched": matched})


# One build context and one health for every plugin; the source contract uses these names.
SourceContext = PluginContext
SourceHealth = PluginHealth


class PermissionSource(Plugin):
    """A live source of what a human may do at a backend."""

    @abstractmethod
    def check(self, query: PermissionQuery) -> SourceAnswer:
        """Ask the backend. A backend that cannot answer is `unknown` with the error as evidence;
        raising is also read as `unknown` (fail closed), but answering is clearer."""
