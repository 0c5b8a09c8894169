"""What a backend plugin declares about its resources: its scheme's grammar and its rules' static checks.

The policy layer (broker/policy/resources.py) parses every resource; it finds the grammar of a
scheme by asking the installed providers (`grammars`, below: each provider's `grammar`, read from
its entry point), so a provider package carries its own grammar and the policy never names a
backend. This module sits on the ground floor, below the policy and the plugin base
(broker/plugins.py), which is why it reads the entry points itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

log = logging.getLogger("broker.plugins")

PROVIDERS = "jit_broker.providers"  # the providers' entry-point group


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


_grammars: dict[str, ResourceGrammar] | None = None  # provider name -> grammar
_grammars_lock = threading.Lock()


def grammars() -> dict[str, ResourceGrammar]:
    """The resource grammar of every installed provider, by provider name (loaded once; see
    `refresh_grammars`). A provider that cannot even be imported is left out, with a warning."""
    global _grammars
    with _grammars_lock:
        if _grammars is None:
            found: dict[str, ResourceGrammar] = {}
            for ep in entry_points(group=PROVIDERS):
                try:
                    target = ep.load()
                except ImportError as exc:
                    log.warning("provider %s cannot be imported (%s); its resources take the generic grammar",
                                ep.name, exc)
                    continue
                grammar = getattr(target, "grammar", None)  # Plugin.grammar (broker/plugins.py)
                if isinstance(target, type) and isinstance(grammar, ResourceGrammar):
                    found[ep.name] = grammar
            _grammars = found
        return _grammars


def refresh_grammars() -> None:
    """Forget the grammars read so far: the next parse reads the installed providers again
    (the broker does this as it starts, so a provider installed since is seen)."""
    global _grammars
    with _grammars_lock:
        _grammars = None
