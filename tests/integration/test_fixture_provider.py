"""A provider added with no change under broker/: a package outside it (tests/support/fixture_provider)
declares an entry point, its own settings and its resource grammar, and the broker mints with it.

The package is "installed" the way pip would: a `*.dist-info` with `entry_points.txt`, generated in a
temporary directory put on sys.path, so the tracked tree stays as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.errors import ConfigError
from broker.grammar import refresh_grammars
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker

POLICY = """\
version: 1
tiers:
  read: {control: auto, max_ttl: 1h}
resources:
  - match: "jwt://x"
    provider: native
    access: {read: {tier: read}}
  - match: "ticket://acme/*"
    provider: ticketer
    access: {read: {tier: read}}
humans:
  alice@example.com: {grants: [{resource: "ticket://**", access: ["*"]}, {resource: "jwt://**", access: ["*"]}]}
agents:
  claude-code: {max_tier: read}
"""


@pytest.fixture
def ticketer_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    site = tmp_path / "site"
    dist = site / "jit_broker_ticketer-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: jit-broker-ticketer\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[jit_broker.providers]\nticketer = tests.support.fixture_provider.ticketer:TicketerProvider\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("BROKER_TICKETER_SECRET", "s3cret-from-env")
    monkeypatch.setenv("BROKER_TICKETER_PREFIX", "envpfx")
    yield
    monkeypatch.undo()
    refresh_grammars()  # the next parse no longer sees the package


def test_a_provider_outside_broker_mints_through_the_api(ticketer_installed: None, database_url: str,
                                                         tmp_path: Path) -> None:
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, POLICY)
    assert type(broker.providers["ticketer"]).__module__ == "tests.support.fixture_provider.ticketer"
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, broker, client)
        session = api.new_session(scope=[{"resource": "ticket://**", "access": ["*"]}])

        # Its grammar canonicalises (lower-cased project) and its settings come from BROKER_* env.
        r = api.request(session, {"resource": "ticket://ACME/42", "access": "read", "ttl_seconds": 300})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["resource"] == "ticket://acme/42"
        assert body["credential"]["type"] == "ticket_pass" and body["credential"]["ticket"] == "acme/42"
        assert body["credential"]["token"].startswith("envpfx_")

        # Its grammar refuses what is not a ticket, with the usual error.
        r = api.request(session, {"resource": "ticket://acme/not-a-number", "access": "read", "ttl_seconds": 300})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid-resource"
        assert "is not a ticket" in r.json()["error"]["message"]
    broker.engine.dispose()


def test_without_its_setting_the_provider_refuses_to_start(ticketer_installed: None, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_TICKETER_SECRET")
    with pytest.raises(ConfigError, match="BROKER_TICKETER_SECRET"):
        build_broker(tmp_path, f"sqlite:///{tmp_path}/broker.db", BrokerSecrets(), POLICY)
