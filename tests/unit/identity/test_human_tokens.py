"""Local human tokens (BROKER_HUMAN_TOKENS): recognised by digest only, the email's canonical form,
refused when malformed; and the CLI's choice of identity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from broker.cli import client
from broker.cli.humans import parse_ttl
from broker.config import Settings
from broker.errors import ConfigError, Unauthenticated
from broker.identity.callers import ApiKeys
from tests.unit.identity.test_principals import LOOKALIKES_OF_KATE


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_human_token_gives_a_human_caller() -> None:
    settings = Settings(human_tokens=f"Dev@Example.com={digest('jbhum_a')}, ops@example.com=sha256:{digest('jbhum_b')}")
    keys = ApiKeys({digest("jborc_x"): "orch"}, digest("jbadm_y"), settings.human_token_hashes())
    dev = keys.lookup("jbhum_a")
    assert (dev.kind, dev.name, dev.groups) == ("human", "dev@example.com", frozenset())
    assert dev.principal == "human:dev@example.com"
    assert keys.lookup("jbhum_b").name == "ops@example.com"
    assert keys.lookup("jborc_x").kind == "orchestrator" and keys.lookup("jbadm_y").kind == "admin"
    with pytest.raises(Unauthenticated):
        keys.lookup(digest("jbhum_a"))  # the digest itself is not a credential


@pytest.mark.parametrize("value", ["dev@example.com", "dev=" + "a" * 64, "dev@example.com=abc",
                                   "dev@example.com=" + "g" * 64])
def test_malformed_entries_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="BROKER_HUMAN_TOKENS"):
        Settings(human_tokens=value).human_token_hashes()


@pytest.mark.parametrize("email", [name for name in LOOKALIKES_OF_KATE
                                   if "@" in name and "," not in name and "=" not in name
                                   and name.strip(" \t\r\n") == name])
def test_configured_humans_must_fit_the_canonical_form(email: str) -> None:
    """A local human named by a look-alike of kate's address is a config error, never a second kate."""
    with pytest.raises(ConfigError, match="not a principal"):
        Settings(human_tokens=f"{email}={digest('jbhum_a')}").human_token_hashes()


def test_configured_humans_are_canonical() -> None:
    hashes = Settings(human_tokens=f" KATE@Example.COM={digest('jbhum_a')} ").human_token_hashes()
    assert hashes == {digest("jbhum_a"): "kate@example.com"}


def test_webhook_urls_need_a_secret_and_http() -> None:
    with pytest.raises(ConfigError, match="BROKER_APPROVAL_WEBHOOK_SECRET"):
        Settings(approval_webhook_urls="https://hooks.example.com/a").approval_webhook_url_list()
    with pytest.raises(ConfigError, match="not an http"):
        Settings(approval_webhook_urls="ftp://x", approval_webhook_secret="s").approval_webhook_url_list()
    assert Settings(approval_webhook_urls="https://a/x, http://b/y",
                    approval_webhook_secret="s").approval_webhook_url_list() == ["https://a/x", "http://b/y"]


def test_cli_picks_the_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("BROKER_TOKEN", "BROKER_AS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BROKER_STATE_DIR", str(tmp_path))
    (tmp_path / "admin-token").write_text("jbadm_local\n")
    assert client.token() == "jbadm_local" and client.token("human") == "jbadm_local"  # no human token yet
    (tmp_path / "human-token").write_text("jbhum_local\n")
    assert client.token("human") == "jbhum_local" and client.token() == "jbadm_local"
    monkeypatch.setenv("BROKER_AS", "admin")
    assert client.token("human") == "jbadm_local"
    monkeypatch.setenv("BROKER_TOKEN", "explicit")
    assert client.token("human") == "explicit"


@pytest.mark.parametrize(("text", "seconds"), [("600", 600), ("90s", 90), ("10m", 600), ("1h30m", 5400), ("1d", 86400)])
def test_ttl_durations(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "10x", "m"])
def test_bad_ttl(text: str) -> None:
    import typer

    with pytest.raises(typer.BadParameter):
        parse_ttl(text)
