"""Trust rules for machine callers: which workload tokens act as which orchestrator or agent runtime.

A rule names one `issuer`, one `audience`, the subject (`subject` exactly, or `subject_pattern`)
and any number of `claim_pattern`s; rules are tried in file order and the first whose every
condition holds wins. Matching is a pure function of (compiled rules, verified claims): no I/O,
no cache. Whoever caches anything upstream must key it by the whole token, never by a part of
what a rule reads (the failure this module exists to rule out is a decision made for one
pipeline's token being served to another's).

Pattern syntax (one value, always matched against the whole claim, never a prefix or a search):

    acme/app                    a literal: equal, nothing more (`repo:acme/app` never matches
                                `repo:acme/app-evil`)
    repo:acme/app:environment:* `*` is any run of characters other than `/` and `:`
    refs/heads/**               `**` is any run of characters at all
    re:^ci-[0-9]+$              `re:` then a Python regular expression, matched with
                                `re.fullmatch` (anchors are implied; `^`/`$` are harmless)

No other character is special in a glob. A claim is read by name or by a dotted path into
nested objects (`kubernetes.io.namespace`); only string claims match, a claim of any other
type (or an absent one, or a path that could mean two claims) never does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, model_validator

__all__ = ["ClaimMatcher", "CompiledTrust", "TrustMatch", "TrustRule", "claim_at", "compile_pattern", "trust_problems"]

REGEX_PREFIX = "re:"
MAX_PATTERN = 1024
_STAR = "[^/:]*"
_DOUBLE_STAR = ".*"


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A pattern (see the module docstring) as a regular expression for `fullmatch`."""
    if pattern.startswith(REGEX_PREFIX):
        return re.compile(pattern[len(REGEX_PREFIX):], re.DOTALL)
    out = []
    for i, chunk in enumerate(pattern.split("**")):
        if i:
            out.append(_DOUBLE_STAR)
        out.append(_STAR.join(re.escape(piece) for piece in chunk.split("*")))
    return re.compile("".join(out), re.DOTALL)


def _check_pattern(value: str) -> str:
    try:
        compile_pattern(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression after 're:': {exc}") from None
    return value


ClaimPattern = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_PATTERN),
    AfterValidator(_check_pattern),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": MAX_PATTERN, "description": (
        "Matched against the whole value: a literal, a glob (`*` any run without `/` or `:`, `**` any run) "
        "or `re:` and a Python regular expression matched with re.fullmatch.")}),
]
# An https issuer (plain http only for loopback test issuers, checked by the server allowlist)
# or a SPIFFE trust domain.
IssuerName = Annotated[str, StringConstraints(pattern=r"^(https?://[^\s]+|spiffe://[a-z0-9._-]+)$", max_length=512)]
ClaimName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")]
TrustRuleName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
OrchestratorName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
# Claims a rule cannot pattern-match through claim_pattern: they have their own fields.
RESERVED_CLAIMS = frozenset({"iss", "aud", "sub", "exp", "nbf", "iat"})


class TrustRule(BaseModel):
    """One trust rule (policy `trust:` section): a workload token that meets it acts as `role`."""

    # As every policy model (`fields.Strict`): a misspelt key is an error, "1" is not 1.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: TrustRuleName  # named in every audit record the caller causes
    role: Literal["orchestrator", "agent"]
    # The orchestrator name the caller acts as (its sessions are those it created); orchestrators only.
    orchestrator: OrchestratorName | None = None
    issuer: IssuerName
    audience: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    subject: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATTERN)] | None = None
    subject_pattern: ClaimPattern | None = None
    claim_pattern: dict[ClaimName, ClaimPattern] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _shape(self) -> TrustRule:
        if (self.subject is None) == (self.subject_pattern is None):
            # An issuer such as GitHub Actions signs for every repository on GitHub: a rule
            # without a subject would let all of them in.
            raise ValueError("a trust rule names exactly one of subject or subject_pattern")
        if self.role == "orchestrator" and self.orchestrator is None:
            raise ValueError("a trust rule with role orchestrator names the orchestrator it acts as")
        if self.role == "agent" and self.orchestrator is not None:
            raise ValueError("orchestrator is for role orchestrator only")
        reserved = RESERVED_CLAIMS & set(self.claim_pattern)
        if reserved:
            raise ValueError(f"claim_pattern cannot name {sorted(reserved)}: use issuer, audience, subject")
        return self


def trust_problems(rules: Sequence[TrustRule]) -> list[tuple[tuple[str | int, ...], str]]:
    """Problems between rules: duplicate names, SPIFFE subjects outside their trust domain."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    seen: dict[str, int] = {}
    for i, rule in enumerate(rules):
        if rule.name in seen:
            problems.append((("trust", i, "name"), f"trust rule name {rule.name!r} is used by trust[{seen[rule.name]}]"))
        seen.setdefault(rule.name, i)
        if rule.issuer.startswith("spiffe://") and rule.subject is not None \
                and not rule.subject.startswith(rule.issuer + "/"):
            problems.append((("trust", i, "subject"),
                             f"a SPIFFE ID of trust domain {rule.issuer} starts with {rule.issuer}/"))
    return problems


def _resolutions(value: Any, path: str, depth: int = 0) -> list[Any]:
    if not isinstance(value, Mapping) or depth > 8:
        return []
    found = [value[path]] if path in value else []
    for i, char in enumerate(path):
        if char == "." and path[:i] in value:
            found.extend(_resolutions(value[path[:i]], path[i + 1:], depth + 1))
    return found


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by dotted path into nested objects, where claim names may hold dots
    themselves (`kubernetes.io.namespace` is `namespace` inside the `kubernetes.io` object). A
    path that reaches two values (a top-level `a.b` and a nested `a` -> `b`) reaches none: the
    token cannot choose which one the rule reads."""
    found = _resolutions(claims, path)
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class ClaimMatcher:
    claim: str
    pattern: str
    regex: re.Pattern[str]

    def matches(self, claims: Mapping[str, Any]) -> bool:
        value = claims.get("sub") if self.claim == "sub" else claim_at(claims, self.claim)
        # Only strings: a number, list or object never equals a pattern by accident.
        return isinstance(value, str) and self.regex.fullmatch(value) is not None


@dataclass(frozen=True)
class CompiledTrustRule:
    index: int
    name: str
    role: str
    orchestrator: str | None
    issuer: str
    audience: str
    subject: str | None  # exact
    matchers: tuple[ClaimMatcher, ...]  # subject_pattern first, then claim_pattern in file order

    @property
    def rule(self) -> str:
        return f"trust[{self.index}]"

    def matches(self, issuer: str, audiences: Sequence[str], claims: Mapping[str, Any]) -> bool:
        if issuer != self.issuer or self.audience not in audiences:
            return False
        if self.subject is not None and claims.get("sub") != self.subject:
            return False
        return all(m.matches(claims) for m in self.matchers)


@dataclass(frozen=True)
class TrustMatch:
    rule: CompiledTrustRule
    issuer: str
    subject: str


class CompiledTrust:
    """The `trust:` section compiled once; `first` is the whole decision."""

    def __init__(self, rules: Sequence[TrustRule]) -> None:
        compiled = []
        for i, r in enumerate(rules):
            matchers = []
            if r.subject_pattern is not None:
                matchers.append(ClaimMatcher("sub", r.subject_pattern, compile_pattern(r.subject_pattern)))
            matchers.extend(ClaimMatcher(c, p, compile_pattern(p)) for c, p in r.claim_pattern.items())
            compiled.append(CompiledTrustRule(i, r.name, r.role, r.orchestrator, r.issuer, r.audience, r.subject,
                                              tuple(matchers)))
        self.rules: tuple[CompiledTrustRule, ...] = tuple(compiled)

    def issuers(self) -> frozenset[str]:
        return frozenset(r.issuer for r in self.rules)

    def audiences(self, issuer: str, role: str) -> list[str]:
        """Every audience a rule of `role` accepts from `issuer` (what the signature check allows)."""
        return sorted({r.audience for r in self.rules if r.issuer == issuer and r.role == role})

    def first(self, role: str, issuer: str, claims: Mapping[str, Any]) -> TrustMatch | None:
        """The first rule of `role`, in file order, that the verified claims meet; None: no rule."""
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else [a for a in aud if isinstance(a, str)] \
            if isinstance(aud, list) else []
        subject = claims.get("sub")
        if not isinstance(subject, str):
            return None
        for rule in self.rules:
            if rule.role == role and rule.matches(issuer, audiences, claims):
                return TrustMatch(rule, issuer, subject)
        return None
