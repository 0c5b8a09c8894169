"""A token revocation is confirmed by OpenBao, never read into an ambiguous refusal.

OpenBao's revoke-accessor answers 400 "token not found" both when nothing is left under the
accessor and when the token is *tainted*: a revocation that a seal or a shutdown cut off marked it
`num_uses: -1` and never finished (OpenBao refuses it on every use, and deletes it at its expiry).
The provider then asks lookup-accessor. Here OpenBao's token endpoints are stood in for with the
answers OpenBao gives (hvac's exceptions, as its HTTP adapter raises them), behind the real
client, so the translation into the broker's errors is the real one too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import hvac.exceptions as hx
import pytest

from broker.errors import ProviderRejected, ProviderUnavailable
from broker.providers.base import RevokeTarget
from broker.providers.vault import VaultProvider
from broker.providers.vault.client import OpenBaoClient

ACCESSOR = "acc-123"


class TokenEndpoints:
    """auth/token/revoke-accessor and lookup-accessor, answering as OpenBao does for one accessor."""

    def __init__(self, revoke: Exception | None, lookup: Exception | dict[str, Any]) -> None:
        self.revoke, self.lookup = revoke, lookup
        self.sent: list[str] = []

    def revoke_accessor(self, accessor: str, mount_point: str) -> None:
        self.sent.append(f"revoke-accessor {accessor}")
        if self.revoke is not None:
            raise self.revoke

    def lookup_accessor(self, accessor: str, mount_point: str) -> dict[str, Any]:
        self.sent.append(f"lookup-accessor {accessor}")
        if isinstance(self.lookup, Exception):
            raise self.lookup
        return {"data": self.lookup}


def provider_with(endpoints: TokenEndpoints) -> VaultProvider:
    client = OpenBaoClient(addr="http://127.0.0.1:8200", token="broker-token")
    client._authenticated, client._renew_at = True, None  # logged in; the fake answers only token calls

    class Auth:
        token = endpoints

    client.hvac = type("FakeHvac", (), {"auth": Auth(), "token": "broker-token"})()
    return VaultProvider(client)


def revoke(p: VaultProvider) -> str:
    return p.revoke(RevokeTarget(capability_id="cap_1", session_id="ses_1", resource="vault://secret/data/allowed",
                                 access="read", handle={"kind": "token", "accessor": ACCESSOR},
                                 expires_at=datetime(2030, 1, 1, tzinfo=UTC))).detail


def not_found() -> hx.InvalidRequest:
    return hx.InvalidRequest("token not found", errors=["token not found"])


def test_a_clean_revocation_is_one_call() -> None:
    endpoints = TokenEndpoints(revoke=None, lookup={})
    assert "revoke-accessor succeeded" in revoke(provider_with(endpoints))
    assert endpoints.sent == [f"revoke-accessor {ACCESSOR}"]


def test_token_not_found_and_the_accessor_gone_is_revoked() -> None:
    endpoints = TokenEndpoints(revoke=not_found(), lookup=hx.InvalidRequest("invalid accessor",
                                                                             errors=["invalid accessor"]))
    assert "no longer knows the token's accessor" in revoke(provider_with(endpoints))
    assert endpoints.sent == [f"revoke-accessor {ACCESSOR}", f"lookup-accessor {ACCESSOR}"]


def test_an_accessor_left_without_its_token_is_revoked() -> None:
    endpoints = TokenEndpoints(revoke=not_found(), lookup=hx.Forbidden("bad token", errors=["bad token"]))
    assert "holds no token under the accessor" in revoke(provider_with(endpoints))


def test_a_tainted_token_is_revoked_and_the_receipt_says_so() -> None:
    """The seal cut the first revocation off after OpenBao marked the token: refused, not yet deleted."""
    endpoints = TokenEndpoints(revoke=not_found(), lookup={"num_uses": -1, "expire_time": "2030-01-01T00:00:00Z"})
    said = revoke(provider_with(endpoints))
    assert "revocation is pending there" in said and "2030-01-01T00:00:00Z" in said


@pytest.mark.parametrize("uses", [0, 3])
def test_token_not_found_with_a_live_token_under_the_accessor_is_not_confirmed(uses: int) -> None:
    """Fail closed: an answer that does not add up leaves the lease pending, retried."""
    endpoints = TokenEndpoints(revoke=not_found(), lookup={"num_uses": uses, "expire_time": "2030-01-01T00:00:00Z"})
    with pytest.raises(ProviderUnavailable):
        revoke(provider_with(endpoints))


@pytest.mark.parametrize(("lookup", "raised"), [
    (hx.VaultDown("Vault is sealed", errors=["Vault is sealed"]), ProviderUnavailable),
    (hx.Forbidden("permission denied", errors=["permission denied"]), ProviderRejected),
])
def test_a_confirmation_openbao_cannot_give_is_no_confirmation(lookup: Exception, raised: type[Exception]) -> None:
    endpoints = TokenEndpoints(revoke=not_found(), lookup=lookup)
    with pytest.raises(raised, match="vault confirm revocation"):
        revoke(provider_with(endpoints))
