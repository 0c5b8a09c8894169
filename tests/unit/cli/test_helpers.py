"""The helpers' pure parts: git's credential description, repository mapping, exec's environment."""

from __future__ import annotations

import io

import pytest
import typer

from broker.cli.helpers import CapabilitySpec, GitTarget, credential_environment, git_target, read_credential_description


def test_reading_gits_description() -> None:
    text = ("protocol=https\nhost=github.com\npath=acme/widgets.git\nwwwauth[]=Basic realm=\"GitHub\"\n"
            "wwwauth[]=Bearer\ncapability[]=authtype\ncapability[]=\nnew-thing=x\nnot a pair\n\nafter=blank\n")
    attrs = read_credential_description(io.StringIO(text))
    assert attrs["protocol"] == ["https"] and attrs["path"] == ["acme/widgets.git"]
    assert attrs["wwwauth[]"] == ['Basic realm="GitHub"', "Bearer"]
    assert "capability[]" not in attrs  # an empty value clears the list, as git defines it
    assert "after" not in attrs and attrs["new-thing"] == ["x"]


@pytest.mark.parametrize(("attrs", "expected"), [
    ({"protocol": "https", "host": "github.com", "path": "acme/widgets.git"}, GitTarget("acme", "widgets")),
    ({"protocol": "https", "host": "github.com", "path": "/acme/widgets/"}, GitTarget("acme", "widgets")),
    ({"protocol": "http", "host": "127.0.0.1:8080", "path": "acme/w.git"}, GitTarget("acme", "w")),
    ({"protocol": "http", "host": "[::1]:8080", "path": "acme/w.git"}, GitTarget("acme", "w")),
    ({"protocol": "https", "host": "evil.example", "path": "acme/widgets.git"}, "not in"),
    ({"protocol": "http", "host": "github.com", "path": "acme/widgets.git"}, "not https"),
    ({"protocol": "https", "host": "github.com"}, "useHttpPath"),
    ({"protocol": "https", "host": "github.com", "path": "acme/widgets/tree/main"}, "not owner/repository"),
    ({"protocol": "https", "host": "github.com", "path": "../etc/passwd"}, "not owner/repository"),
])
def test_git_target(attrs: dict[str, str], expected: GitTarget | str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_GIT_HOSTS", "github.com, 127.0.0.1:8080,[::1]:8080")
    got = git_target({k: [v] for k, v in attrs.items()})
    if isinstance(expected, str):
        assert isinstance(got, str) and expected in got
    else:
        assert got == expected and got.resource == f"github://{expected.owner}/{expected.repo}"


def test_capability_spec() -> None:
    assert CapabilitySpec.parse("jwt://payments-api=read") == CapabilitySpec("jwt://payments-api", "read", "PAYMENTS_API")
    assert CapabilitySpec.parse("vault://database/creds/ledger-test=test-write@DB").name == "DB"
    for bad in ("payments-api=read", "jwt://x", "jwt://x="):
        with pytest.raises(typer.BadParameter):
            CapabilitySpec.parse(bad)


def test_credential_environment() -> None:
    aws = {"resource": "aws://1/role/r", "expires_at": "2030-01-01T00:00:00Z", "credential": {
        "type": "aws_sts", "access_key_id": "AK", "secret_access_key": "SK", "session_token": "ST", "region": "eu-west-1"}}
    assert credential_environment(aws, "R") == {
        "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK", "AWS_SESSION_TOKEN": "ST",
        "AWS_CREDENTIAL_EXPIRATION": "2030-01-01T00:00:00Z", "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1"}
    assert credential_environment({"credential": {"type": "github_token", "token": "ghs_x"}}, "W") == {
        "GH_TOKEN": "ghs_x", "GITHUB_TOKEN": "ghs_x"}
    dynamic = {"credential": {"type": "vault_secret", "data": {"username": "u", "password": "p"}}}
    assert credential_environment(dynamic, "LEDGER_TEST") == {
        "BROKER_SECRET_LEDGER_TEST_USERNAME": "u", "BROKER_SECRET_LEDGER_TEST_PASSWORD": "p"}
    with pytest.raises(Exception, match="no environment mapping"):
        credential_environment({"resource": "x://y", "credential": {"type": "carrier-pigeon"}}, "X")
