"""Config refuses to start without what production needs; openapi.yaml matches the app."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import Settings
from broker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_openapi_yaml_matches_the_app() -> None:
    from broker.openapi import render

    assert (ROOT / "openapi.yaml").read_text() == render(), "run: python -m broker.openapi > openapi.yaml"


def test_production_start_names_every_missing_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("BROKER_POLICY_FILE", "BROKER_SIGNING_KEY_DIR", "BROKER_ENCRYPTION_KEY", "BROKER_ORCHESTRATOR_API_KEYS",
                "BROKER_ADMIN_TOKEN_SHA256", "BROKER_EMBEDDED"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError) as info:
        Settings().check_for_production()
    for name in ("BROKER_POLICY_FILE", "BROKER_SIGNING_KEY_DIR", "BROKER_ENCRYPTION_KEY", "BROKER_ORCHESTRATOR_API_KEYS"):
        assert name in info.value.message
    Settings(embedded=True).check_for_production()  # the embedded default generates them


@pytest.mark.parametrize("entry", ["orch", "orch=abc", "orch=" + "g" * 64, "=" + "a" * 64 + "x"])
def test_malformed_orchestrator_keys_are_refused(entry: str) -> None:
    with pytest.raises(ConfigError, match="BROKER_ORCHESTRATOR_API_KEYS"):
        Settings(orchestrator_api_keys=entry).orchestrator_key_hashes()


def test_orchestrator_keys_are_parsed_as_digests() -> None:
    digest = "a" * 64
    assert Settings(orchestrator_api_keys=f"ci=sha256:{digest}, other={'b' * 64}").orchestrator_key_hashes() == {
        digest: "ci", "b" * 64: "other"}


def test_unknown_database_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="BROKER_DATABASE_URL"):
        Settings(database_url="mysql://x")
