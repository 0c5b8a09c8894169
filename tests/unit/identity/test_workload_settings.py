"""BROKER_TRUSTED_ISSUERS at start: what counts as a way in, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import Settings
from broker.errors import ConfigError

BASE = {"policy_file": Path("p.yaml"), "signing_key_dir": Path("k"), "encryption_key": "x" * 44,
        "orchestrator_api_keys": "", "admin_token_sha256": None, "oidc_issuer": None}


@pytest.mark.parametrize("raw", ["", "  ", "[]", " [ ] "])
def test_an_empty_allowlist_is_no_way_in(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_EMBEDDED", raising=False)
    with pytest.raises(ConfigError, match="BROKER_TRUSTED_ISSUERS"):
        Settings(**BASE, trusted_issuers=raw).check_for_production()


def test_an_allowlist_alone_is_a_way_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_EMBEDDED", raising=False)
    Settings(**BASE, trusted_issuers="https://token.actions.githubusercontent.com").check_for_production()


@pytest.mark.parametrize("own", ["issuer", "oidc_issuer"])
def test_the_broker_and_the_human_idp_are_never_workload_issuers(own: str) -> None:
    url = "https://idp.example.com"
    settings = Settings(**{own: url, "trusted_issuers": url + ",https://token.actions.githubusercontent.com"})
    with pytest.raises(ConfigError, match="human IdP"):
        settings.trusted_issuer_map()
