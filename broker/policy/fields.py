"""The value types a policy file is validated with: tier names and their risk order, durations,
principals, group, agent, provider and access names, approvers, resource patterns, regular
expressions and host patterns, and `Strict`, the base every policy model shares.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, StringConstraints, WithJsonSchema

from broker.policy.resources import canonical_pattern, pattern_problem
from broker.principals import group_problem, principal_problem

TierName = Literal["read", "write", "review", "merge_deploy", "secret", "destructive"]
# Risk order, lowest first: an agent's max_tier admits every tier at or before it.
TIER_ORDER: tuple[str, ...] = ("read", "write", "review", "merge_deploy", "secret", "destructive")
DEFAULT_ESCALATION_TIERS: tuple[TierName, ...] = ("merge_deploy", "secret")

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
DURATION_PATTERN = _DURATION.pattern
_UNIT_SECONDS = (86400, 3600, 60, 1)


def parse_duration(value: Any) -> Any:
    """90, "90s", "30m", "1h", "1h30m", "1d" -> seconds. Anything else is left for the int check."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like 90s, 30m, 1h30m")
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            seconds = int(text)
        else:
            found = _DURATION.match(text)
            if not text or found is None:
                raise ValueError(f"invalid duration {value!r}: use seconds or a string like 90s, 30m, 1h30m")
            seconds = sum(int(n) * unit for n, unit in zip(found.groups(), _UNIT_SECONDS, strict=True) if n)
        value = seconds
    if isinstance(value, int) and value <= 0:
        raise ValueError("a duration must be at least 1 second")
    return value


Duration = Annotated[
    int,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1},
                {"type": "string", "pattern": DURATION_PATTERN, "minLength": 2},
            ],
            "description": "Seconds, or a duration string such as 90s, 30m, 1h, 1h30m.",
        }
    ),
]



def _check_principal(value: str) -> str:
    """A human named by the policy must already fit the canonical form: it is refused, never changed."""
    problem = principal_problem(value)
    if problem is not None:
        raise ValueError(f"{value!r} is not a principal in the broker's canonical form: {problem}")
    return value


def _check_group(value: str) -> str:
    problem = group_problem(value)
    if problem is not None:
        raise ValueError(f"{value!r} is not a group name: {problem}")
    return value


def _check_approver(value: str) -> str:
    if value.startswith("group:"):
        _check_group(value.removeprefix("group:"))
    else:
        _check_principal(value.removeprefix("user:"))
    return value


Email = Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$", max_length=320), AfterValidator(_check_principal)]
GroupName = Annotated[str, StringConstraints(pattern=r"^\S+$", max_length=256), AfterValidator(_check_group)]
AgentName = Annotated[str, StringConstraints(pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")]
ProviderName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
AccessName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
GrantedAccess = Annotated[str, StringConstraints(pattern=r"^(\*|[a-z][a-z0-9_-]{0,63})$")]
# "group:<name>", "user:<email>" or a bare email.
Approver = Annotated[str, StringConstraints(pattern=r"^(group:\S+|user:[^@\s]+@[^@\s]+|[^@\s:]+@[^@\s]+)$"),
                     AfterValidator(_check_approver)]


class Strict(BaseModel):
    # forbid: a misspelt key is an error, never a silently ignored rule.
    # strict: "1" is not 1 and "yes" is not true; a policy says exactly what it means.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _check_pattern(value: str) -> str:
    """Refuse a malformed pattern; keep the canonical form (see broker.policy.resources)."""
    problem = pattern_problem(value)
    if problem is not None:
        raise ValueError(f"resource pattern {problem}")
    return canonical_pattern(value)


ResourcePattern = Annotated[
    str,
    BeforeValidator(_check_pattern),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^[a-z][a-z0-9+.-]{0,31}://[A-Za-z0-9._~@+=,:*-]+(/[A-Za-z0-9._~@+=,:*-]+)*$",
            "maxLength": 512,
            "description": '"<scheme>://<glob>": * matches within one path segment, ** across segments.',
        }
    ),
]


HookDecision = Literal["allow", "ask", "deny"]


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None
    return value


Regex = Annotated[
    str,
    StringConstraints(min_length=1, max_length=1024),
    AfterValidator(_check_regex),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 1024,
                    "description": "A Python regular expression."}),
]
# "github.com", "*.githubusercontent.com" (subdomains only), "registry.npmjs.org:443".
_HOST_LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
HostPattern = Annotated[
    str, StringConstraints(pattern=rf"^(\*\.)?{_HOST_LABEL}(\.{_HOST_LABEL})*(:\d{{1,5}})?$", max_length=260)
]
RuleName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
