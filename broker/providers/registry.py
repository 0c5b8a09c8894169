"""Builds providers by name from the `jit_broker.providers` entry points.

A deployment adds a backend by installing a package that declares an entry point in that
group; the broker is not edited. Only providers the policy names are built.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from broker.errors import ConfigError, ProviderMisconfigured
from broker.plugins import build_named
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


def build(names: set[str], ctx: ProviderContext, *, tolerate_missing: bool) -> dict[str, Provider]:
    def make(name: str, factory: Any) -> Provider:
        if not (isinstance(factory, type) and issubclass(factory, Provider)):
            raise ConfigError(f"entry point {GROUP}:{name} is not a broker.providers.base.Provider subclass")
        return factory.from_context(ctx)

    def placeholder(name: str, exc: Exception) -> Provider:
        return UnconfiguredProvider(name, str(exc))

    return build_named(GROUP, "provider", names, make, placeholder if tolerate_missing else None)
