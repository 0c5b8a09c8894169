"""A real moto server (STS + IAM over HTTP) for the aws provider's tests, and what it received.

moto runs as a subprocess (`python -m moto.server`) on a free loopback port, so the provider's
real boto3 clients sign and send real HTTP requests. moto's own request recorder
(`MOTO_ENABLE_RECORDING`, read back through `/moto-api/recorder/download-recording`) is the
recording transport: tests assert on the parameters that arrived at the server, not on what
the code meant to send.

moto does not evaluate IAM policies (any credential may do anything), so tests prove a deny by
the content of the policy document, never by a call being refused.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import boto3
import pytest

from tests.support.children import die_with_parent, terminate
from tests.support.ports import free_port

MOTO_ACCOUNT = "123456789012"  # moto's default account
MOTO_REGION = "us-east-1"
# Distinctive on purpose: a test can search exception text for it.
DUMMY_ACCESS_KEY_ID = "testing"
DUMMY_SECRET_ACCESS_KEY = "moto-dummy-secret-never-in-errors"

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_ACCESS_KEY,
    "AWS_DEFAULT_REGION": MOTO_REGION,
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance metadata service
    "AWS_CONFIG_FILE": os.devnull,  # nobody's ~/.aws leaks into a test
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_AWS_ENV_UNSET = (
    "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL_IAM",
)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as moto received it: the query-protocol form, flattened."""

    method: str
    url: str
    params: dict[str, str]

    @property
    def action(self) -> str:
        return self.params.get("Action", "")

    @property
    def tags(self) -> dict[str, str]:
        """`Tags.member.N.Key/Value` back into a mapping."""
        out = {}
        n = 1
        while f"Tags.member.{n}.Key" in self.params:
            out[self.params[f"Tags.member.{n}.Key"]] = self.params.get(f"Tags.member.{n}.Value", "")
            n += 1
        return out


@dataclass(frozen=True)
class MotoServer:
    endpoint: str

    def requests(self, action: str | None = None, **match: str) -> list[RecordedRequest]:
        """Everything moto received since it started (filter by Action and exact params)."""
        recording = f"{self.endpoint}/moto-api/recorder/download-recording"
        with urllib.request.urlopen(recording, timeout=5) as resp:  # noqa: S310  # our own http:// moto endpoint
            lines = resp.read().decode().splitlines()
        out = []
        for line in filter(None, lines):
            entry = json.loads(line)
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode("utf-8", "replace")
            request = RecordedRequest(entry["method"], entry["url"], dict(parse_qsl(body, keep_blank_values=True)))
            if action is not None and request.action != action:
                continue
            if any(request.params.get(k) != v for k, v in match.items()):
                continue
            out.append(request)
        return out


@dataclass(frozen=True)
class AwsRole:
    name: str
    arn: str
    role_id: str
    account: str = MOTO_ACCOUNT

    @property
    def resource(self) -> str:
        return f"aws://{self.account}/role/{self.name}"


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    """Dummy AWS credentials in the environment for every boto3 client the tests make; restored after."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _AWS_ENV.items():
            mp.setenv(name, value)
        for name in _AWS_ENV_UNSET:
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    recording = tmp_path_factory.mktemp("moto") / "requests.jsonl"
    recording.touch()
    port = free_port()
    env = dict(os.environ, MOTO_ENABLE_RECORDING="true", MOTO_RECORDER_FILEPATH=str(recording))
    log_file = (recording.parent / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent(signal.SIGTERM),
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).close()  # noqa: S310  # local moto we started
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start; see {log_file.name}") from None
                time.sleep(0.05)
        yield MotoServer(endpoint)
    finally:
        # moto's server can sit out a SIGTERM while boto3 keeps connections open to it: its
        # state is not needed after the run, so it gets 2 s, not the default 10, before SIGKILL.
        terminate(proc, grace=2)
        log_file.close()


@pytest.fixture(scope="session")
def aws_endpoint(moto_server: MotoServer, aws_env: None) -> str:
    """The moto endpoint URL (with dummy credentials in the environment)."""
    return moto_server.endpoint


@pytest.fixture(scope="session")
def iam_client(aws_endpoint: str) -> Any:  # boto3 clients have no importable type
    return boto3.client("iam", endpoint_url=aws_endpoint, region_name=MOTO_REGION)


@pytest.fixture(scope="session")
def sts_client(aws_endpoint: str) -> Any:
    return boto3.client("sts", endpoint_url=aws_endpoint, region_name=MOTO_REGION)


def trust_policy(account: str = MOTO_ACCOUNT) -> dict[str, Any]:
    """What a role the broker mints for must trust: AssumeRole, session tags, source identity."""
    return {
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
            "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
        }],
    }


@pytest.fixture
def aws_role(iam_client: Any) -> Iterator[AwsRole]:
    """A fresh role per test: trust policy as above, MaxSessionDuration 3600, an attached policy."""
    name = f"jit-test-{uuid.uuid4().hex[:12]}"
    role = iam_client.create_role(
        RoleName=name,
        AssumeRolePolicyDocument=json.dumps(trust_policy()),
        MaxSessionDuration=3600,
    )["Role"]
    policy_arn = iam_client.create_policy(
        PolicyName=f"{name}-read",
        PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}],
        }),
    )["Policy"]["Arn"]
    iam_client.attach_role_policy(RoleName=name, PolicyArn=policy_arn)
    yield AwsRole(name=name, arn=role["Arn"], role_id=role["RoleId"])
    for inline in iam_client.list_role_policies(RoleName=name)["PolicyNames"]:
        iam_client.delete_role_policy(RoleName=name, PolicyName=inline)
    iam_client.detach_role_policy(RoleName=name, PolicyArn=policy_arn)
    iam_client.delete_policy(PolicyArn=policy_arn)
    iam_client.delete_role(RoleName=name)
