"""The openbao permission source: the policies the human's OpenBao identity entity holds now.

Reads OpenBao's identity store with the broker's own Vault credentials (BROKER_VAULT_*):
`identity/entity/name/<entity>` for the entity (its own `policies`, whether it is `disabled`,
its `group_ids` and `inherited_group_ids`), then `identity/group/id/<id>` for each group's
`policies`. The answer is the set of policy names the entity holds, matched against the rule's
`require[access]`: `require: {test-write: [ledger-writer, ledger-admin]}`. Someone removed from
the OpenBao group that carries `ledger-writer` loses the access here at the next check.

Why policy names and not capabilities on the path: OpenBao evaluates capabilities only for a
token (`sys/capabilities`), so asking it for an entity means minting a token that IS the human,
which would let the broker act as anyone; re-implementing OpenBao's ACL matching in the broker
would be a second, divergent ACL engine. Policy names are what the identity store holds and
what an operator grants, and reading them needs nothing but `read` on two identity paths
(`openbao_source_policy_hcl`).

Who the human is at OpenBao: the policy's `humans.<email>.openbao_entity` (the entity's name).
A missing, unknown or disabled entity is deny; an OpenBao that cannot answer is unknown.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar
from urllib.parse import quote

from pydantic_settings import BaseSettings

from broker.errors import BrokerError
from broker.permissions.base import PermissionQuery, PermissionSource, SourceAnswer, SourceContext, SourceHealth, judge
from broker.providers.vault.client import OpenBaoClient
from broker.providers.vault.provider import openbao_client
from broker.providers.vault.settings import VaultSettings

MAX_GROUPS = 100  # an entity in more groups than this is refused rather than read without end
_GROUP_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# Entity names as operators write them (often an email or a login); never a path segment like "..".
_ENTITY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


def openbao_source_policy_hcl(identity_mount: str = "identity") -> str:
    """What the broker's own OpenBao policy needs for this source (read-only)."""
    paths = (f"{identity_mount}/entity/name/*", f"{identity_mount}/group/id/*")
    return "".join(f'path "{p}" {{\n  capabilities = ["read"]\n}}\n' for p in paths)


class OpenBaoPermissionSource(PermissionSource):
    settings_model: ClassVar[type[BaseSettings]] = VaultSettings
    name: ClassVar[str] = "openbao"

    def __init__(self, client: OpenBaoClient) -> None:
        self._client = client

    @classmethod
    def from_context(cls, ctx: SourceContext) -> OpenBaoPermissionSource:
        # The vault provider's settings (BROKER_VAULT_*) and, when it runs too, its client.
        return cls(openbao_client(ctx))

    def check(self, query: PermissionQuery) -> SourceAnswer:
        entity_name = query.identity.get("openbao_entity")
        if not entity_name:
            return SourceAnswer.deny(f"no OpenBao entity is mapped for {query.human} (humans.{query.human}.openbao_entity)")
        if not _ENTITY_NAME.match(entity_name) or ".." in entity_name:
            return SourceAnswer.deny(f"{entity_name!r} is not an OpenBao entity name this source asks about")
        mount = str(query.options.get("identity_mount") or "identity").strip("/")
        if not _ENTITY_NAME.match(mount) or ".." in mount:
            return SourceAnswer.unknown(f"options.identity_mount {mount!r} is not a mount name")
        try:
            entity = _data(self._client.read(f"{mount}/entity/name/{quote(entity_name, safe='')}"))
            if entity is None:
                return SourceAnswer.deny(f"OpenBao has no entity named {entity_name}", entity=entity_name)
            if entity.get("disabled"):
                return SourceAnswer.deny(f"OpenBao entity {entity_name} is disabled", entity=entity_name,
                                         entity_id=entity.get("id"))
            policies = set(_names(entity.get("policies")))
            group_ids = list(dict.fromkeys(_names(entity.get("group_ids")) + _names(entity.get("inherited_group_ids"))))
            if len(group_ids) > MAX_GROUPS:
                return SourceAnswer.unknown(f"entity {entity_name} is in {len(group_ids)} groups, more than {MAX_GROUPS}")
            groups = []
            for gid in group_ids:
                if not _GROUP_ID.match(gid):
                    return SourceAnswer.unknown(f"OpenBao listed a group id {gid!r} that is no id")
                group = _data(self._client.read(f"{mount}/group/id/{gid}"))
                if group is None:
                    continue  # deleted between the two reads: it grants nothing now
                groups.append(str(group.get("name") or gid))
                policies |= set(_names(group.get("policies")))
        except BrokerError as exc:
            return SourceAnswer.unknown(exc.message[:300], error=exc.code, entity=entity_name)
        shown = ", ".join(sorted(policies)) or "no policies"
        return judge(policies, query, f"OpenBao: entity {entity_name} holds {shown}", entity=entity_name,
                     entity_id=entity.get("id"), groups=sorted(groups), policies=sorted(policies))

    def health(self) -> SourceHealth:
        return self._client.health()

    def close(self) -> None:
        self._client.close()


def _data(answer: dict[str, Any] | None) -> dict[str, Any] | None:
    if not answer:
        return None
    data = answer.get("data")
    return data if isinstance(data, dict) else None


def _names(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str) and v] if isinstance(value, list) else []
