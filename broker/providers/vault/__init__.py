"""The vault backend (OpenBao/Vault): tokens and dynamic secrets (provider), identity-store policies (permission source).

Settings: `settings.py` (BROKER_VAULT_*). Resource grammar: `vault://<path>`, the generic grammar
(`GRAMMAR` below). Narrowed policies and operator set-up: `acl.py`.
"""

from broker.grammar import ResourceGrammar
from broker.providers.vault.acl import bootstrap_token_role, broker_policy_hcl
from broker.providers.vault.provider import VaultProvider, vault_path
from broker.providers.vault.settings import VaultSettings
from broker.providers.vault.source import OpenBaoPermissionSource, openbao_source_policy_hcl

GRAMMAR = ResourceGrammar("vault")  # any non-empty run of segments, as written

__all__ = ["GRAMMAR", "OpenBaoPermissionSource", "VaultProvider", "VaultSettings", "bootstrap_token_role",
           "broker_policy_hcl", "openbao_source_policy_hcl", "vault_path"]
