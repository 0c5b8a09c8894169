"""`broker-cli aws-credential-process` as a real boto3 profile's `credential_process`, against moto."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import boto3
import botocore.exceptions
import httpx
import pytest

from tests.support.aws_moto import MOTO_REGION, AwsRole
from tests.support.brokers import STANDARD_TIERS, Api, BrokerSecrets, LiveServer, build_broker
from tests.support.processes import BROKER_CLI

POLICY = STANDARD_TIERS + """\
resources:
  - match: "aws://123456789012/role/*"
    provider: aws
    access:
      read:
        tier: read
        session_policy: {Version: "2012-10-17", Statement: [{Effect: Allow, Action: ["s3:GetObject"], Resource: ["*"]}]}
humans:
  alice@example.com:
    grants: [{resource: "aws://**", access: [read]}]
agents:
  claude-code: {max_tier: write}
"""


@pytest.fixture
def aws_broker(tmp_path: Path, aws_endpoint: str) -> Iterator[Api]:
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, f"sqlite:///{tmp_path}/broker.db", secrets_, POLICY,
                          aws_endpoint_url=aws_endpoint, aws_region=MOTO_REGION)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)


def profile(tmp_path: Path, resource: str) -> Path:
    # No --ttl 900: botocore refreshes credentials with less than 15 minutes left, so an STS-minimum
    # lease would be replaced on every call. The tier's max_ttl (1h here) is the better default.
    config = tmp_path / "aws-config"
    config.write_text(
        "[profile agent]\n"
        f"credential_process = \"{BROKER_CLI}\" aws-credential-process --resource {resource} --access read\n"
        f"region = {MOTO_REGION}\n")
    return config


def test_boto3_profile_gets_the_capabilitys_session(aws_broker: Api, aws_role: AwsRole, aws_endpoint: str,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = aws_broker
    session = api.new_session(scope=[{"resource": aws_role.resource, "access": ["read"]}])
    monkeypatch.setenv("AWS_CONFIG_FILE", str(profile(tmp_path, aws_role.resource)))
    monkeypatch.setenv("BROKER_URL", api.base_url)
    monkeypatch.setenv("BROKER_SESSION_TOKEN", session["session_token"])

    boto = boto3.Session(profile_name="agent")
    identity = boto.client("sts", endpoint_url=aws_endpoint).get_caller_identity()
    caps = api.client.get("/v1/capabilities", params={"session_id": session["session_id"]}, headers=api.as_admin()).json()
    assert len(caps) == 1 and caps[0]["resource"] == aws_role.resource and caps[0]["status"] == "active"
    # The role session is named after the capability: these are the broker's credentials, not the environment's.
    assert identity["Arn"] == f"arn:aws:sts::123456789012:assumed-role/{aws_role.name}/{caps[0]['capability_id']}"
    frozen = boto.get_credentials().get_frozen_credentials()
    assert frozen.access_key != "testing"  # the dummy key of the test environment

    # The JSON itself, as the AWS docs define it.
    out = subprocess.run([BROKER_CLI, "aws-credential-process", "--resource", aws_role.resource, "--access", "read"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert set(answer) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}
    assert answer["Version"] == 1
    expires = datetime.fromisoformat(answer["Expiration"].replace("Z", "+00:00"))
    assert expires > datetime.now(UTC)


def test_refusal_is_on_stderr_without_secrets(aws_broker: Api, aws_role: AwsRole, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    api = aws_broker
    session = api.new_session(scope=[{"resource": "aws://123456789012/role/other", "access": ["read"]}])
    monkeypatch.setenv("AWS_CONFIG_FILE", str(profile(tmp_path, aws_role.resource)))
    monkeypatch.setenv("BROKER_URL", api.base_url)
    monkeypatch.setenv("BROKER_SESSION_TOKEN", session["session_token"])

    out = subprocess.run([BROKER_CLI, "aws-credential-process", "--resource", aws_role.resource, "--access", "read"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stdout == ""
    assert "outside-task-scope" in out.stderr and session["session_token"] not in out.stderr
    with pytest.raises(botocore.exceptions.CredentialRetrievalError):
        boto3.Session(profile_name="agent").get_credentials()

    monkeypatch.setenv("BROKER_URL", "http://127.0.0.1:9")  # nobody listens on the discard port
    monkeypatch.setenv("BROKER_RETRY_SECONDS", "1")  # a helper waits for a restarting broker; not long here
    down = subprocess.run([BROKER_CLI, "aws-credential-process", "--resource", aws_role.resource, "--access", "read"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode != 0 and "cannot reach the broker" in down.stderr
    assert "waiting for the broker at http://127.0.0.1:9" in down.stderr
