"""Builds the providers the policy names from the `jit_broker.providers` entry points (broker/plugins.py)."""

from __future__ import annotations

from typing import ClassVar

from broker.errors import ProviderMisconfigured
from broker.grammar import PROVIDERS
from broker.plugins import PluginContext, Unconfigured, build
from broker.providers.base import Grant, Minted, Provider, RevokeTarget


class UnconfiguredProvider(Unconfigured, Provider):
    """The placeholder for a provider that cannot start (embedded default only): every call
    fails closed with the reason, and readiness shows it."""

    name: ClassVar[str] = "unconfigured"

    @classmethod
    def from_context(cls, ctx: PluginContext) -> UnconfiguredProvider:
        raise ProviderMisconfigured("the placeholder provider is built by the registry, not from an entry point")

    def mint(self, grant: Grant) -> Minted:
        raise ProviderMisconfigured(f"provider {self.plugin_name} is not configured: {self.reason}")

    def revoke(self, target: RevokeTarget) -> None:
        raise ProviderMisconfigured(f"provider {self.plugin_name} is not configured: {self.reason}")


def build_providers(names: set[str], ctx: PluginContext, *, tolerate_missing: bool) -> dict[str, Provider]:
    return build(PROVIDERS, Provider, names, ctx, UnconfiguredProvider if tolerate_missing else None)
