"""The `ticketer` provider: a made-up backend that issues one-ticket passes, to prove a provider
is added with no change under broker/ (its entry point, settings and resource grammar are its own).

Resources: `ticket://<project>/<number>` (a lowercase project, a ticket number). Settings:
BROKER_TICKETER_SECRET (required) and BROKER_TICKETER_PREFIX.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import ClassVar

from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.errors import ProviderMisconfigured
from broker.grammar import ResourceGrammar, ResourceRefused
from broker.providers.base import Grant, Minted, Provider, ProviderContext, Revoked, RevokeTarget, fingerprint

_PROJECT = re.compile(r"[a-z]{2,20}")
_NUMBER = re.compile(r"[1-9][0-9]{0,8}")


def canonical(segments: list[str]) -> list[str]:
    if len(segments) != 2 or _PROJECT.fullmatch(segments[0].lower()) is None or _NUMBER.fullmatch(segments[1]) is None:
        raise ResourceRefused("is not a ticket: expected ticket://<project>/<number>")
    return [segments[0].lower(), segments[1]]


class TicketerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="ignore", case_sensitive=False)

    ticketer_secret: str | None = None
    ticketer_prefix: str = "tk"


class TicketerProvider(Provider):
    name: ClassVar[str] = "ticketer"
    grammar: ClassVar[ResourceGrammar] = ResourceGrammar("ticket", canonical, case_insensitive=True)
    settings_model: ClassVar[type[BaseSettings]] = TicketerSettings

    def __init__(self, settings: TicketerSettings, secret: str) -> None:
        self.settings, self._secret = settings, secret

    @classmethod
    def from_context(cls, ctx: ProviderContext) -> TicketerProvider:
        settings = ctx.settings_for(TicketerSettings)
        if not settings.ticketer_secret:
            raise ProviderMisconfigured("ticketer: set BROKER_TICKETER_SECRET")
        return cls(settings, settings.ticketer_secret)

    def mint(self, grant: Grant) -> Minted:
        digest = hashlib.sha256(f"{self._secret}:{grant.capability_id}".encode()).hexdigest()[:24]
        token = f"{self.settings.ticketer_prefix}_{digest}"
        return Minted(credential={"type": "ticket_pass", "ticket": grant.resource_path, "token": token},
                      handle={"ticket": grant.resource_path}, fingerprint=fingerprint(token),
                      expires_at=datetime.now(UTC) + timedelta(seconds=grant.ttl_seconds))

    def revoke(self, target: RevokeTarget) -> Revoked:
        return Revoked(detail="ticketer passes are revoked by forgetting them")
