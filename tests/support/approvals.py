"""A policy and a broker for the human side: a delegator, approvers with and without the
permission, a four-eyes tier, and every caller's credentials."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker

APPROVALS_POLICY = """\
version: 1
tiers:
  read:         {control: auto,     max_ttl: 1h}
  write:        {control: auto,     max_ttl: 30m}
  review:       {control: auto,     max_ttl: 30m}
  merge_deploy: {control: approval, max_ttl: 10m, approvers: [group:maintainers]}
  secret:       {control: approval, max_ttl: 10m, approvers: [group:security, erin@example.com], min_approvals: 2}
  destructive:  {control: deny}
resources:
  - match: "jwt://payments-api"
    provider: native
    access:
      read:   {tier: read,  scope: "ledger:read"}
      write:  {tier: write, scope: "ledger:write"}
      deploy: {tier: merge_deploy, scope: "ledger:deploy"}
      rotate: {tier: secret, scope: "ledger:rotate"}
      drop:   {tier: destructive}
humans:
  alice@example.com:          # the delegator; also a maintainer
    groups: [maintainers]
    grants: [{resource: "jwt://payments-api", access: [read, write, deploy, rotate, drop]}]
  bob@example.com:            # an approver who holds deploy
    groups: [maintainers]
    grants: [{resource: "jwt://payments-api", access: [read, deploy]}]
  carol@example.com:          # a named approver without the permission
    groups: [maintainers]
    grants: [{resource: "jwt://payments-api", access: [read]}]
  dave@example.com:           # security
    groups: [security]
    grants: [{resource: "jwt://payments-api", access: [rotate]}]
  erin@example.com:           # named by email for secrets
    grants: [{resource: "jwt://payments-api", access: [rotate, deploy]}]
  mallory@example.com:        # another human: delegates her own sessions, approves nothing
    grants: [{resource: "jwt://payments-api", access: [read, deploy]}]
agents:
  claude-code: {max_tier: secret}
budgets: {max_issued_per_session: 50, max_active_per_session: 30}
"""

DEPLOY = {"resource": "jwt://payments-api", "access": "deploy", "ttl_seconds": 300, "tool": "deploy-cli",
          "parameters": {"env": "prod", "version": "1.4.2"}}


def open_broker(tmp_path: Path, database_url: str, policy: str = APPROVALS_POLICY, **settings: Any) -> tuple[Any, BrokerSecrets]:
    secrets_ = BrokerSecrets()
    return build_broker(tmp_path, database_url, secrets_, policy, **settings), secrets_


@pytest.fixture
def humans_api(database_url: str, tmp_path: Path) -> Iterator[Api]:
    broker, secrets_ = open_broker(tmp_path, database_url)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)


def agent(session: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {session['session_token']}"}
