"""A broker built for tests: real keys, real database (migrated), a policy written to disk,
served by a real uvicorn on a free loopback port."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from broker.app import BACKGROUND, create_app
from broker.config import Settings
from broker.identity.keys import rotate
from broker.migrate import upgrade
from broker.runtime import Broker
from tests.support.ports import free_port

# The standard tiers (docs/decisions.md), shared by every test policy.
STANDARD_TIERS = """\
version: 1
tiers:
  read:         {control: auto,     max_ttl: 1h}
  write:        {control: auto,     max_ttl: 30m}
  review:       {control: auto,     max_ttl: 30m}
  merge_deploy: {control: approval, max_ttl: 10m, approvers: [group:maintainers]}
  secret:       {control: approval, max_ttl: 10m, approvers: [group:security]}
  destructive:  {control: deny}
"""

# The native resource most tests ask for; a policy adds accesses below it (drop, rotate ...).
PAYMENTS_API = """\
  - match: "jwt://payments-api"
    provider: native
    access:
      read:   {tier: read,  scope: "ledger:read"}
      write:  {tier: write, scope: "ledger:write"}
      deploy: {tier: merge_deploy, scope: "ledger:deploy"}
"""

TEST_POLICY = STANDARD_TIERS + "resources:\n" + PAYMENTS_API + """\
      drop:   {tier: destructive}
  - match: "jwt://svc/*"
    provider: native
    access:
      read: {tier: read}
humans:
  alice@example.com:
    grants:
      - {resource: "jwt://payments-api", access: [read, write, deploy, drop]}
      - {resource: "jwt://svc/*", access: [read]}
agents:
  claude-code: {max_tier: merge_deploy}
  ops-bot: {max_tier: destructive}
budgets: {max_issued_per_session: 50, max_active_per_session: 30}
"""


TEST_HUMANS = ("alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com",
               "erin@example.com", "mallory@example.com")


@dataclass
class BrokerSecrets:
    orchestrator_key: str = field(default_factory=lambda: "jborc_" + secrets.token_urlsafe(24))
    admin_token: str = field(default_factory=lambda: "jbadm_" + secrets.token_urlsafe(24))
    encryption_key: str = field(default_factory=lambda: base64.b64encode(os.urandom(32)).decode())
    webhook_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    # Local human tokens (BROKER_HUMAN_TOKENS): the humans the test policies name.
    human_tokens: dict[str, str] = field(default_factory=lambda: {
        email: "jbhum_" + secrets.token_urlsafe(24) for email in TEST_HUMANS})
    # One OpenID SSF receiver, "receiver" (BROKER_SSF_RECEIVER_TOKENS), that may manage its own streams.
    ssf_receiver_token: str = field(default_factory=lambda: "jbssf_" + secrets.token_urlsafe(24))

    def env(self, directory: Path, database_url: str, policy: str = TEST_POLICY, **extra: str) -> dict[str, str]:
        policy_file = directory / "policy.yaml"
        if not policy_file.exists():
            policy_file.write_text(policy)
        keys = directory / "keys"
        if not keys.exists():
            rotate(keys)
        env = {
            "BROKER_DATABASE_URL": database_url,
            "BROKER_POLICY_FILE": str(policy_file),
            "BROKER_SIGNING_KEY_DIR": str(keys),
            "BROKER_ENCRYPTION_KEY": self.encryption_key,
            "BROKER_ORCHESTRATOR_API_KEYS": "orch=" + hashlib.sha256(self.orchestrator_key.encode()).hexdigest(),
            "BROKER_ADMIN_TOKEN_SHA256": hashlib.sha256(self.admin_token.encode()).hexdigest(),
            "BROKER_WEBHOOK_SECRETS": self.webhook_secret,
            "BROKER_HUMAN_TOKENS": ",".join(f"{email}={hashlib.sha256(tok.encode()).hexdigest()}"
                                            for email, tok in self.human_tokens.items()),
            "BROKER_SSF_RECEIVER_TOKENS": f"receiver={hashlib.sha256(self.ssf_receiver_token.encode()).hexdigest()}",
        }
        env.update(extra)
        return env


def build_broker(directory: Path, database_url: str, secrets_: BrokerSecrets, policy: str = TEST_POLICY,
                 **overrides: Any) -> Broker:
    env = secrets_.env(directory, database_url, policy)
    settings = Settings(**{**{k.removeprefix("BROKER_").lower(): v for k, v in env.items()}, **overrides})
    upgrade(settings.database_url)
    return Broker.build(settings)


class LiveServer:
    """uvicorn in a thread: real HTTP, real lifespan (sweeper included when asked)."""

    def __init__(self, broker: Broker, *, sweeper: bool = False, outbox: bool | None = None,
                 port: int | None = None) -> None:
        self.broker = broker
        self.port = port or free_port()  # given when the broker's settings must name it (BROKER_PUBLIC_URL)
        self.base_url = f"http://127.0.0.1:{self.port}"
        # sweeper: every background loop; outbox (default: as sweeper) adds or removes the outbox's.
        loops = set(BACKGROUND) if sweeper else set()
        if outbox is not None:
            loops = loops | {"outbox"} if outbox else loops - {"outbox"}
        app = create_app(broker=broker, background=loops)
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test broker did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.broker.engine.dispose()


@dataclass
class Api:
    """A test's view of one running broker, with the credentials each kind of caller holds."""

    base_url: str
    secrets: BrokerSecrets
    broker: Broker
    client: httpx.Client

    def as_orchestrator(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets.orchestrator_key}"}

    def as_admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets.admin_token}"}

    def as_human(self, email: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets.human_tokens[email]}"}

    def new_session(self, *, scope: list[dict[str, Any]] | None = None, ttl: int = 3600, human: str = "alice@example.com",
                    agent: str = "claude-code", task_id: str = "task-1", **extra: Any) -> dict[str, Any]:
        body = {"human": human, "agent": agent, "task_id": task_id, "ttl_seconds": ttl,
                "scope": scope or [{"resource": "jwt://**", "access": ["*"]}], **extra}
        r = self.client.post("/v1/sessions", json=body, headers=self.as_orchestrator())
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def request(self, session: dict[str, Any], body: dict[str, Any], **headers: str) -> httpx.Response:
        return self.client.post(
            "/v1/capabilities", json={"purpose": "test", **body},
            headers={"Authorization": f"Bearer {session['session_token']}", **headers},
        )


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[Api]:
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)
