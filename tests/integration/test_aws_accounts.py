"""The broker's own AWS account decides which aws rules a policy may hold (moto's STS answers
123456789012): a rule for another account is refused at start, and at request time it is a 403,
never a 500 naming the broker's account."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, select

from broker.errors import PolicyError
from broker.models import Lease
from tests.support.aws_moto import MOTO_ACCOUNT, MOTO_REGION
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker

OTHER = "210987654321"
POLICY = """\
version: 1
tiers:
  read: {control: auto, max_ttl: 1h}
resources:
  - match: "aws://ACCOUNT/role/*"
    provider: aws
    access:
      read:
        tier: read
        session_policy: {Version: "2012-10-17", Statement: [{Effect: Allow, Action: ["s3:GetObject"], Resource: ["*"]}]}
humans:
  alice@example.com: {grants: [{resource: "aws://**", access: ["*"]}]}
agents:
  claude-code: {max_tier: read}
"""


def test_a_rule_for_another_account_is_refused_at_start_via_sts(
    tmp_path: Path, aws_endpoint: str
) -> None:
    sqlite_url = f"sqlite:///{tmp_path}/broker.db"
    with pytest.raises(PolicyError) as caught:
        build_broker(tmp_path, sqlite_url, BrokerSecrets(), POLICY.replace("ACCOUNT", OTHER),
                     aws_endpoint_url=aws_endpoint, aws_region=MOTO_REGION)
    [problem] = caught.value.problems
    assert problem["line"] == 5 and problem["path"] == "resources[0].match"
    assert OTHER in problem["message"]


def test_the_account_can_come_from_config(tmp_path: Path) -> None:
    """BROKER_AWS_ACCOUNT_ID: no STS call needed (the endpoint here answers nothing)."""
    sqlite_url = f"sqlite:///{tmp_path}/broker.db"
    with pytest.raises(PolicyError, match="not the broker's own account"):
        build_broker(tmp_path, sqlite_url, BrokerSecrets(), POLICY.replace("ACCOUNT", OTHER),
                     aws_account_id=MOTO_ACCOUNT, aws_endpoint_url="http://127.0.0.1:9", aws_region=MOTO_REGION)


def test_reload_keeps_the_last_good_policy(tmp_path: Path, aws_endpoint: str) -> None:
    sqlite_url = f"sqlite:///{tmp_path}/broker.db"
    broker = build_broker(tmp_path, sqlite_url, BrokerSecrets(), POLICY.replace("ACCOUNT", MOTO_ACCOUNT),
                          aws_endpoint_url=aws_endpoint, aws_region=MOTO_REGION)
    good = broker.policies.current.version
    assert broker.settings.policy_file is not None
    broker.settings.policy_file.write_text(POLICY.replace("ACCOUNT", OTHER))
    assert broker.policies.reload() is False
    assert broker.policies.current.version == good
    broker.engine.dispose()


def test_request_time_check_answers_403_not_500(database_url: str, tmp_path: Path, aws_endpoint: str) -> None:
    """Defence in depth: configured as another account than STS says, the provider still refuses."""
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, POLICY.replace("ACCOUNT", OTHER),
                          aws_account_id=OTHER, aws_endpoint_url=aws_endpoint, aws_region=MOTO_REGION)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, broker, client)
        session = api.new_session(scope=[{"resource": "aws://**", "access": ["*"]}])
        r = api.request(session, {"resource": f"aws://{OTHER}/role/elsewhere", "access": "read", "ttl_seconds": 900})
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "cross-account-role"
        assert MOTO_ACCOUNT not in r.text
        with Session(broker.engine) as db:
            assert db.exec(select(Lease).where(Lease.session_id == session["session_id"])).all() == []
