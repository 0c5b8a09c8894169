"""broker-cli's token file and token choice, without a network."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from broker.cli import login


def test_token_file_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BROKER_TOKEN_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert login.token_file() == tmp_path / "xdg" / "jit-broker" / "tokens.json"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert login.token_file() == tmp_path / "home" / ".config" / "jit-broker" / "tokens.json"
    monkeypatch.setenv("BROKER_TOKEN_FILE", str(tmp_path / "elsewhere.json"))
    assert login.token_file() == tmp_path / "elsewhere.json"


def test_store_is_owner_only_and_per_broker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "tokens.json"
    monkeypatch.setenv("BROKER_TOKEN_FILE", str(path))
    old = os.umask(0)  # the process umask must not matter: even with 0 the file is born 0600
    try:
        login._save_entry("http://a", {"client_id": "c", "token": {"access_token": "x.y.z", "expires_at": 2**40}})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert login.current_token("http://a") == "x.y.z"
    assert login.current_token("http://b") is None  # never sent to a broker it was not obtained for
    path.chmod(0o640)
    with pytest.raises(login.LoginRequired, match="readable by others"):
        login.current_token("http://a")


def test_expired_without_refresh_token_asks_for_login(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BROKER_TOKEN_FILE", str(tmp_path / "t.json"))
    login._save_entry("http://a", {"client_id": "c", "token": {"access_token": "x.y.z", "expires_at": 1}})
    with pytest.raises(login.LoginRequired, match="expired"):
        login.current_token("http://a")


@pytest.mark.parametrize(("token", "expected"), [
    ({"access_token": "h.p.s", "id_token": "i.d.t"}, "h.p.s"),  # a JWT access token is the bearer
    ({"access_token": "ya29.opaque-google-token", "id_token": "i.d.t"}, "i.d.t"),  # opaque: the ID token
    ({"access_token": "opaque"}, "opaque"),
])
def test_bearer_choice(token: dict[str, str], expected: str) -> None:
    assert login.bearer_of(token) == expected


def test_refresh_happens_once_when_many_find_the_token_stale(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Threads stand in for CLI processes (flock locks per open file, so they exclude each other too)."""
    import threading
    import time

    monkeypatch.setenv("BROKER_TOKEN_FILE", str(tmp_path / "t.json"))
    login._save_entry("http://a", {"client_id": "c", "token_endpoint": "http://idp/token",
                                   "token": {"access_token": "old.old.old", "refresh_token": "r1", "expires_at": 1}})
    calls: list[str] = []
    inside = threading.Semaphore(1)

    def slow_refresh(broker: str, entry: dict) -> str:
        assert inside.acquire(blocking=False), "two refreshes at once"
        try:
            calls.append(entry["token"]["refresh_token"])
            time.sleep(0.2)  # long enough for every other thread to find the token stale
            entry["token"] = {"access_token": "new.new.new", "refresh_token": "r2", "expires_at": 2**40}
            login._save_entry(broker, entry)
            return "new.new.new"
        finally:
            inside.release()

    monkeypatch.setattr(login, "_refresh", slow_refresh)
    got: list[str | None] = []
    threads = [threading.Thread(target=lambda: got.append(login.current_token("http://a"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == ["new.new.new"] * 4
    assert calls == ["r1"], "one refresh, with the refresh token that was current"
