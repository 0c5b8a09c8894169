"""Builds providers by name from the `jit_broker.providers` entry points.

A deployment adds a backend by installing a package that declares an entry point in that
group; the broker is not edited. Only providers the policy names are built.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any, ClassVar

from broker.errors import BrokerError, ConfigError, ProviderMisconfigured
from broker.providers.base import Grant, Minted, Provider, ProviderContext, ProviderHealth, RevokeTarget

log = logging.getLogger("broker.providers")
GROUP = "jit_broker.providers"


class UnconfiguredProvider(Provider):
    """Stands in (embedded default only) for a provider whose config is missing: every call
    fails closed with the reason, and readiness shows it."""

    name: ClassVar[str] = "unconfigured"

    def __init__(self, name: str, reason: str) -> None:
        self.provider_name = name
        self.reason = reason

    @classmethod
    def from_context(cls, ctx: ProviderContext) -> Provider:
        raise ProviderMisconfigured("the placeholder provider is built by the registry, not from an entry point")

    def mint(self, grant: Grant) -> Minted:
        raise ProviderMisconfigured(f"provider {self.provider_name} is not configured: {self.reason}")

    def revoke(self, target: RevokeTarget) -> None:
        raise ProviderMisconfigured(f"provider {self.provider_name} is not configured: {self.reason}")

    def health(self) -> ProviderHealth:
        return ProviderHealth(False, f"not configured: {self.reason}")


def available() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def build(names: set[str], ctx: ProviderContext, *, tolerate_missing: bool) -> dict[str, Provider]:
    found = available()
    out: dict[str, Provider] = {}
    for name in sorted(names):
        if name not in found:
            raise ConfigError(f"the policy names provider {name!r}, but no entry point {GROUP}:{name} is installed")
        try:
            factory = found[name].load()
            if not (isinstance(factory, type) and issubclass(factory, Provider)):
                raise ConfigError(f"entry point {GROUP}:{name} is not a broker.providers.base.Provider subclass")
            out[name] = factory.from_context(ctx)
        except (BrokerError, ImportError) as exc:
            if not tolerate_missing:
                raise ConfigError(f"provider {name!r} cannot start: {exc}") from exc
            log.warning("provider %s is not configured (%s); requests for it will fail", name, exc)
            out[name] = UnconfiguredProvider(name, str(exc))
    return out
