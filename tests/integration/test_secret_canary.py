"""The secret canary: mint with every provider at DEBUG, then look for each secret everywhere else.

Every provider mints against its real backend (native, a Vault token, a Vault dynamic database
secret, AWS STS on moto, the GitHub stand-in) with the broker's own logging configuration and
then every logger turned to DEBUG. Each secret value may appear in exactly one place: the mint
response that hands it over. It must not be in any log line, any other response (session,
capability reads, lists, readiness, metrics, audit, receipts), any row of any table, or the
audit export (`broker-cli audit export`).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from broker.cli.main import app as cli
from broker.logs import configure_logging
from tests.integration.test_all_providers import _dump, five_asks, serve_all_providers
from tests.support.aws_moto import AwsRole
from tests.support.brokers import Api
from tests.support.github_standin import GitHubStandIn
from tests.support.openbao import VaultDatabase, VaultSetup


class _WireCounter(logging.Handler):
    """Counts DEBUG records of SDK wire loggers (unfiltered) without keeping their text: proof
    that the SDKs really talked at DEBUG, so the clean log is the filter's doing."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.INFO and record.name.split(".")[0] in ("botocore", "urllib3", "hvac", "httpx",
                                                                          "httpcore"):
            self.count += 1


@pytest.fixture(params=["text", "json"])
def debug_logs(request: pytest.FixtureRequest) -> Iterator[tuple[io.StringIO, _WireCounter]]:
    """The broker's own logging set-up (`configure_logging`, as `serve` calls it) writing into a
    buffer, in either format, then every logger there is turned all the way up."""
    root = logging.getLogger()
    saved_handlers, saved_root = list(root.handlers), root.level
    saved = {name: lg.level for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    stream = io.StringIO()
    configure_logging("debug", request.param, stream=stream)
    counter = _WireCounter()
    root.addHandler(counter)
    for lg in [root, *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]:
        lg.setLevel(logging.DEBUG)  # SDKs included: the filter must hold even then
    try:
        yield stream, counter
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_root)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture
def everything(database_url: str, tmp_path: Path, vault_setup: VaultSetup, vault_database: VaultDatabase,
               aws_endpoint: str, aws_role: AwsRole, github_standin: GitHubStandIn,
               debug_logs: tuple[io.StringIO, _WireCounter]) -> Iterator[Api]:
    with serve_all_providers(database_url, tmp_path, vault_setup, aws_endpoint, github_standin,
                             log_level="debug") as api:
        yield api


def test_no_secret_outside_its_one_mint_response(
    everything: Api, aws_role: AwsRole, debug_logs: tuple[io.StringIO, _WireCounter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = everything
    stream, wire = debug_logs
    session = api.new_session(scope=[{"resource": f"{scheme}://**", "access": ["*"]}
                                     for scheme in ("jwt", "vault", "aws", "github")])
    asks = five_asks(aws_role)
    caps: dict[str, dict[str, Any]] = {}
    for name, ask in asks.items():
        r = api.request(session, ask)
        assert r.status_code == 201, (name, r.text)
        caps[name] = r.json()
    cred = {name: cap["credential"] for name, cap in caps.items()}
    canaries = {
        "native token": cred["native"]["token"],
        "vault token": cred["vault_token"]["token"],
        "db password": cred["vault_db"]["data"]["password"],
        "aws secret key": cred["aws"]["secret_access_key"],
        "aws session token": cred["aws"]["session_token"],
        "github token": cred["github"]["token"],
    }
    assert all(len(v) >= 16 for v in canaries.values()), canaries.keys()
    session_token = session["session_token"]

    # Every other answer the broker gives about this session and its capabilities.
    admin, agent = api.as_admin(), {"Authorization": f"Bearer {session_token}"}
    sid = session["session_id"]
    responses: list[httpx.Response] = [
        api.client.get(f"/v1/sessions/{sid}", headers=admin),
        api.client.get(f"/v1/sessions/{sid}", headers=api.as_orchestrator()),
        api.client.get("/v1/capabilities", params={"session_id": sid}, headers=admin),
        api.client.get("/v1/capabilities", params={"session_id": sid}, headers=agent),
        *(api.client.get(f"/v1/capabilities/{c['capability_id']}", headers=agent) for c in caps.values()),
        api.client.post("/v1/introspect", data={"token": cred["native"]["token"]}),
        api.client.get("/readyz"),
        api.client.get("/metrics"),
        api.client.get("/.well-known/jwks.json"),
        api.client.get("/v1/audit", params={"session_id": sid, "limit": 1000}, headers=admin),
        api.client.get("/v1/audit/verify", headers=admin),
        api.client.delete(f"/v1/capabilities/{caps['native']['capability_id']}", headers=agent),
        api.client.post("/v1/policy/explain", headers=admin,
                        json={"session_id": sid, "resource": "vault://secret/data/allowed", "access": "read"}),
        api.client.post(f"/v1/sessions/{sid}/end", json={"reason": "completed"}, headers=api.as_orchestrator()),
        api.client.get(f"/v1/sessions/{sid}", headers=admin),
        api.client.get("/v1/capabilities", params={"session_id": sid}, headers=admin),
        api.client.get("/v1/audit", params={"limit": 1000}, headers=admin),
    ]
    assert [r.status_code for r in responses if r.status_code >= 400] == [], [r.text for r in responses
                                                                             if r.status_code >= 400]
    assert responses[-1].json(), "the audit answered no records"

    monkeypatch.setenv("BROKER_URL", api.base_url)
    monkeypatch.setenv("BROKER_TOKEN", api.secrets.admin_token)
    exported = CliRunner().invoke(cli, ["audit", "export"])
    assert exported.exit_code == 0, exported.output
    assert len(exported.output.splitlines()) >= 10 and json.loads(exported.output.splitlines()[0])

    logs = stream.getvalue()
    assert "debug" in logs.lower() and len(logs.splitlines()) > 20  # the broker did log, at DEBUG
    assert wire.count > 0  # and the SDKs chattered at DEBUG; the filter kept it out
    places = {
        "log lines": logs,
        "database dump": _dump(api),
        "audit export": exported.output,
        **{f"response {r.request.method} {r.request.url.path}": r.text for r in responses},
    }
    for where, text in places.items():
        for what, value in canaries.items():
            assert value not in text, f"{what} found in {where}"
        assert session_token not in text, f"session token found in {where}"
