"""The vault provider's (and the openbao permission source's) settings: BROKER_VAULT_*."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class VaultSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="ignore", case_sensitive=False)

    vault_addr: str | None = None
    vault_namespace: str | None = None
    vault_token: SecretStr | None = None  # the broker's own Vault token, or use AppRole below
    vault_role_id: str | None = None
    vault_secret_id: SecretStr | None = None
    vault_approle_mount: str = "approle"
    # Token role the broker creates capability tokens through: orphan tokens, so they do not
    # die with the broker's own token, with the role's allowed policies as a second ceiling.
    vault_token_role: str = "jit-broker"  # noqa: S105  # a token role's name, not a secret
