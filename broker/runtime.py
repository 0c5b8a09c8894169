"""The running broker: settings, database, policy, keys and providers, built once at start.

`Broker.build` is where missing or bad configuration is refused with a message that says
what to set. The embedded default generates what it lacks into `state_dir` and warns.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from pydantic import SecretStr
from sqlalchemy.engine import Engine

from broker import crypto
from broker.config import Settings
from broker.db import make_engine
from broker.grammar import refresh_grammars
from broker.identity.keys import KeyRing
from broker.identity.oidc import OidcVerifier
from broker.identity.workload import WorkloadVerifier
from broker.permissions.budget import LiveCheckBudget
from broker.permissions.registry import LivePermissions, build_sources
from broker.plugins import PluginContext
from broker.policy import PolicyStore
from broker.providers.base import Provider
from broker.providers.registry import build_providers
from broker.store import SessionCache, Store

log = logging.getLogger("broker")

EMBEDDED_WARNING = (
    "jit-broker is running the EMBEDDED DEFAULT: SQLite, keys and tokens generated into %s. "
    "This is for trying the broker on one machine, NOT for production."
)


# The example policy's trial user; `broker-cli dev` gives it a local human token.
EMBEDDED_HUMAN = "dev@example.com"


def _generated(path: Path, make: Callable[[], str]) -> str:
    """The secret in `path`, written (0600 from creation) the first time."""
    if not path.exists():
        crypto.write_secret(path, make() + "\n")
    return path.read_text().strip()


def _token(prefix: str) -> Callable[[], str]:
    return lambda: prefix + secrets.token_urlsafe(32)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def prepare_embedded(settings: Settings) -> Settings:
    """Fill in what the embedded default may generate; never overwrite what exists."""
    state = settings.state_dir
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A laptop trial has no instance role: never let the AWS SDK probe the metadata address.
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    updates: dict[str, object] = {}
    if settings.signing_key_dir is None:
        updates["signing_key_dir"] = state / "signing-keys"
    if settings.encryption_key is None:
        updates["encryption_key"] = SecretStr(_generated(state / "encryption-key", crypto.new_key))
    if settings.admin_token_sha256 is None:
        updates["admin_token_sha256"] = _digest(_generated(state / "admin-token", _token("jbadm_")))
    if not settings.orchestrator_api_keys:
        digest = _digest(_generated(state / "orchestrator-key", _token("jborc_")))
        updates["orchestrator_api_keys"] = f"local-orchestrator={digest}"
    if not settings.human_tokens:
        # The trial user of the example policy, so one person can try the human side too.
        updates["human_tokens"] = f"{EMBEDDED_HUMAN}={_digest(_generated(state / 'human-token', _token('jbhum_')))}"
    if settings.policy_file is None:
        policy = state / "policy.yaml"
        if not policy.exists():
            # 0600 like every other file of the state directory: the policy names the people.
            crypto.write_secret(policy, (resources.files("broker.policy") / "example.yaml").read_text())
        updates["policy_file"] = policy
    return settings.model_copy(update=updates)


@dataclass
class Broker:
    settings: Settings
    engine: Engine
    policies: PolicyStore
    keyring: KeyRing
    providers: dict[str, Provider]
    sealer: crypto.Sealer
    # Humans (and client-credentials orchestrators) through the configured IdP; None without one.
    oidc: OidcVerifier | None = None
    # Machines through workload tokens under the policy's trust rules (BROKER_TRUSTED_ISSUERS).
    workload: WorkloadVerifier = field(default_factory=lambda: WorkloadVerifier({}))
    replica_id: str = field(default_factory=lambda: "r-" + secrets.token_hex(4))
    # Live permission sources the policy names (github, openbao, ...), with their answer cache.
    permissions: LivePermissions = field(default_factory=lambda: LivePermissions({}, 0))
    # The request path's store, opened on the event loop by the app's lifespan (None before: the
    # full path alone), and the sessions it has read.
    store: Store | None = None
    sessions: SessionCache = field(default_factory=SessionCache)

    @classmethod
    def build(cls, settings: Settings, *, engine: Engine | None = None) -> Broker:
        if settings.embedded:
            settings = prepare_embedded(settings)
            log.warning(EMBEDDED_WARNING, settings.state_dir.resolve())
        settings.check_for_production()
        refresh_grammars()  # resource grammars of the providers installed now
        assert settings.policy_file is not None and settings.signing_key_dir is not None  # noqa: S101  # type narrowing: Settings fills them in its validator
        assert settings.encryption_key is not None  # noqa: S101  # type narrowing: Settings fills it in its validator
        policies = PolicyStore(settings.policy_file, settings.shadow_policy_file)
        keyring = KeyRing.load(
            settings.signing_key_dir,
            retire_after=settings.session_max_ttl_seconds,
            create=settings.embedded,
        )
        sealer = crypto.Sealer(crypto.decode_key(settings.encryption_key.get_secret_value()))
        oidc_config = settings.oidc_config()
        names = {r.provider for r in policies.current.resources}
        if policies.shadow is not None:
            names |= {r.provider for r in policies.shadow.resources}
        names.add("native")
        # One context for every plugin: a provider and a source of one backend share its client.
        context = PluginContext(settings=settings, keyring=keyring)
        providers = build_providers(names, context, tolerate_missing=settings.embedded)
        checks = {name: check for name, provider in providers.items() if (check := provider.policy_check()) is not None}
        if checks:
            policies.adopt_checks(checks)  # PolicyError: refused at start like any bad file
        source_names = set(policies.current.live_sources())
        if policies.shadow is not None:
            source_names |= policies.shadow.live_sources()
        sources = build_sources(source_names, context, tolerate_missing=settings.embedded)
        return cls(
            settings=settings,
            engine=engine or make_engine(settings.database_url),
            policies=policies,
            keyring=keyring,
            providers=providers,
            sealer=sealer,
            oidc=OidcVerifier(oidc_config) if oidc_config else None,
            workload=WorkloadVerifier(
                settings.trusted_issuer_map(), leeway_seconds=settings.workload_leeway_seconds,
                max_lifetime_seconds=settings.workload_max_token_lifetime_seconds,
                refresh_cooldown_seconds=settings.workload_jwks_refresh_cooldown_seconds,
                max_age_seconds=settings.workload_jwks_max_age_seconds,
                timeout_seconds=settings.workload_timeout_seconds,
            ),
            permissions=LivePermissions(sources, settings.permission_cache_seconds,
                                        LiveCheckBudget(settings.live_check_budget, settings.live_check_budget_seconds)),
        )

    def provider(self, name: str) -> Provider:
        from broker.errors import ProviderMisconfigured

        try:
            return self.providers[name]
        except KeyError:
            raise ProviderMisconfigured(f"provider {name!r} was not built; reload the broker after adding it") from None
