"""What a backend plugin declares about its resources: its scheme's grammar and its rules' static checks.

The policy layer (broker/policy/resources.py) parses every resource; it finds the grammar of a
scheme by asking the installed plugins (broker/plugins.py), so a provider package carries its
own grammar and the policy never names a backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class ResourceRefused(ValueError):
    """Why a string is not a resource (or pattern); the message completes "resource 'x' ..."."""


def _as_written(segments: list[str]) -> list[str]:
    return segments


def _no_problem(match: str) -> str | None:
    return None


@dataclass(frozen=True)
class ResourceGrammar:
    """One scheme's rule on top of the generic grammar (see broker/policy/resources.py).

    `canonical(segments)` gets the checked segments of a concrete resource and returns its
    canonical segments, or raises ResourceRefused. `case_insensitive` lower-cases patterns'
    literal text too. `rule_problem(match)` is asked of every policy rule whose provider declares
    this grammar, when the policy loads (a rule a glob would make unsafe, say); None means fine.
    """

    scheme: str
    canonical: Callable[[list[str]], list[str]] = _as_written
    case_insensitive: bool = False
    rule_problem: Callable[[str], str | None] = _no_problem


# A check a running plugin adds to every policy load (the aws provider: rules must be for the
# broker's own account): the rule's match in, a problem or None out.
RuleCheck = Callable[[str], str | None]
