"""Building what the policy names from installed entry points (providers, permission sources).

A deployment adds a backend by installing a package that declares an entry point; the broker
is not edited. Only what the policy names is built. A name with no entry point is a
configuration error; one that cannot start is too, unless `placeholder` stands in for it (the
embedded default), which fails closed on use and shows in readiness.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from broker.errors import BrokerError, ConfigError

log = logging.getLogger("broker.plugins")
T = TypeVar("T")


def build_named(group: str, what: str, names: Iterable[str], make: Callable[[str, Any], T],
                placeholder: Callable[[str, Exception], T] | None) -> dict[str, T]:
    """`make(name, loaded entry point)` for each name; `placeholder(name, error)` where it cannot start."""
    found = {ep.name: ep for ep in entry_points(group=group)}
    out: dict[str, T] = {}
    for name in sorted(names):
        if name not in found:
            raise ConfigError(f"the policy names {what} {name!r}, but no entry point {group}:{name} is installed")
        try:
            out[name] = make(name, found[name].load())
        except (BrokerError, ImportError) as exc:
            if placeholder is None:
                raise ConfigError(f"{what} {name!r} cannot start: {exc}") from exc
            log.warning("%s %s is not configured (%s); it fails closed", what, name, exc)
            out[name] = placeholder(name, exc)
    return out
