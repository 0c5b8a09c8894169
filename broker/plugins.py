"""Backend plugins (providers, permission sources): one base, one build context, one registry.

A deployment adds a backend by installing a package that declares an entry point in
`jit_broker.providers` or `jit_broker.permission_sources`; the broker is not edited. Every
entry point's target subclasses `Plugin`: it is built with `from_context(PluginContext)`, which
hands it its own settings (`ctx.settings_for(MySettings)`, read from BROKER_* variables), the
broker's signing keys and a client shared with the other plugins of its backend. Only what the
policy names is built. A name with no entry point is a configuration error; one that cannot
start is too, unless a placeholder stands in for it (the embedded default), which fails closed
on use and shows in readiness.

A provider also declares its resource grammar (`grammar`, broker/grammar.py); the policy asks
`grammars()` for the grammar of each scheme, so no core module names a backend.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic_settings import BaseSettings

from broker.errors import BrokerError, ConfigError
from broker.grammar import PROVIDERS, ResourceGrammar, RuleCheck

if TYPE_CHECKING:
    from broker.config import Settings
    from broker.identity.keys import KeyRing

log = logging.getLogger("broker.plugins")

PERMISSION_SOURCES = "jit_broker.permission_sources"

P = TypeVar("P", bound="Plugin")
S = TypeVar("S", bound=BaseSettings)
C = TypeVar("C")


@dataclass(frozen=True)
class PluginHealth:
    """For readiness: what a plugin says about its backend."""

    ok: bool
    detail: str = ""


@dataclass
class PluginContext:
    """What every plugin gets when it is built."""

    settings: Settings  # the broker's core settings (timeouts, issuer ...)
    keyring: KeyRing | None = None  # the broker's signing keys (the native provider signs with them)
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def settings_for(self, model: type[S]) -> S:
        """The plugin's own settings model (pydantic-settings, `env_prefix="BROKER_"`): read from
        the environment, with any value given to the core `Settings(...)` by name taking precedence
        (tests and tools build settings in code)."""
        given = {k: v for k, v in (self.settings.model_extra or {}).items() if k in model.model_fields}
        return model(**given)

    def shared(self, key: str, make: Callable[[], C]) -> C:
        """One backend client per `key` for the plugins built from this context: a provider and a
        permission source of the same backend talk to it through one client (one login, one pool)."""
        with self._lock:
            if key not in self._clients:
                self._clients[key] = make()
            client: C = self._clients[key]
            return client


class Plugin(ABC):
    """What every backend plugin is. Providers (broker/providers/base.py) and permission sources
    (broker/permissions/base.py) add their own operations on top."""

    name: ClassVar[str]  # the policy's value (`provider:` / `human_permission.source:`) and the entry point's name

    #: The resource scheme this plugin defines (providers only); None: the generic grammar.
    grammar: ClassVar[ResourceGrammar | None] = None

    #: The plugin's own settings model (BROKER_* variables), read with `ctx.settings_for(...)`;
    #: declared so tools (the helm chart's check) can list every setting. None: it has none.
    settings_model: ClassVar[type[BaseSettings] | None] = None

    @classmethod
    @abstractmethod
    def from_context(cls: type[P], ctx: PluginContext) -> P:
        """The entry point's target: build from the context, or raise ProviderMisconfigured."""

    def health(self) -> PluginHealth:
        """For readiness: cheap, never raises, reports."""
        return PluginHealth(True, "no health check")

    def policy_check(self) -> RuleCheck | None:
        """A check every policy load applies to the rules naming this plugin, now that it runs
        (the aws provider: rules must be for the broker's own account); None: nothing to add."""
        return None

    def close(self) -> None:
        """Release connections at shutdown."""
        return


class Unconfigured:
    """Stands in (embedded default only) for a plugin whose config is missing: it fails closed
    with the reason, and readiness shows it. Each kind mixes it into its own placeholder."""

    def __init__(self, name: str, reason: str) -> None:
        self.plugin_name = name
        self.reason = reason

    def health(self) -> PluginHealth:
        return PluginHealth(False, f"not configured: {self.reason}")

    def close(self) -> None:
        return None


def build(group: str, base: type, names: Iterable[str], ctx: PluginContext,
          placeholder: Callable[[str, str], P] | None) -> dict[str, Any]:
    """`from_context(ctx)` of each named entry point; `placeholder(name, reason)` where one cannot
    start and the deployment tolerates that (the embedded default)."""
    what = _KIND.get(group, group)
    found = {ep.name: ep for ep in entry_points(group=group)}
    out: dict[str, Any] = {}  # each a `base`: checked below
    for name in sorted(names):
        if name not in found:
            raise ConfigError(f"the policy names {what} {name!r}, but no entry point {group}:{name} is installed")
        try:
            target = found[name].load()
            if not (isinstance(target, type) and issubclass(target, base) and issubclass(target, Plugin)):
                raise ConfigError(f"entry point {group}:{name} is not a {base.__module__}.{base.__name__} subclass")
            plugin: Plugin = target.from_context(ctx)
            out[name] = plugin
        except (BrokerError, ImportError) as exc:
            if placeholder is None:
                raise ConfigError(f"{what} {name!r} cannot start: {exc}") from exc
            log.warning("%s %s is not configured (%s); it fails closed", what, name, exc)
            out[name] = placeholder(name, str(exc))
    return out


_KIND = {PROVIDERS: "provider", PERMISSION_SOURCES: "permission source"}


def installed_settings_models() -> list[type[BaseSettings]]:
    """The settings models the installed plugins declare (each once), for tools that list settings."""
    models: list[type[BaseSettings]] = []
    for group in (PROVIDERS, PERMISSION_SOURCES):
        for ep in entry_points(group=group):
            target = ep.load()
            if isinstance(target, type) and issubclass(target, Plugin) and target.settings_model is not None \
                    and target.settings_model not in models:
                models.append(target.settings_model)
    return models
