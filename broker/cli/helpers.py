"""Helpers an agent's tools call without knowing the broker: git, the AWS SDKs, any command.

- `git-credential get|store|erase`: git's credential helper protocol -> a GitHub capability.
- `aws-credential-process`: the AWS SDKs' `credential_process` JSON -> an AWS capability.
- `exec -- CMD`: a command run with short-lived credentials in its environment, revoked after.
- `hook pre-tool-use` (broker/cli/hook.py): the tool-call gate as a Claude Code command hook.

All of them speak to the broker as the agent (`BROKER_SESSION_TOKEN`); none prints a secret
anywhere but where its consumer reads it (git's and the SDK's stdin, the child's environment).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TextIO

import typer

from broker.cli.agent import AgentClient, HelperError, fingerprint
from broker.cli.durations import parse_duration
from broker.cli.hook import hook_app

GIT_HOSTS_ENV = "BROKER_GIT_HOSTS"  # comma-separated host[:port] the helper answers for
GIT_ACCESS_ENV = "BROKER_GIT_ACCESS"  # access asked for when --access is not given
DEFAULT_GIT_HOSTS = "github.com"
DEFAULT_GIT_ACCESS = "read"
GIT_USERNAME = "x-access-token"  # what GitHub expects beside an installation token
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_LOOPBACK_NAMES = {"localhost"}
EXIT_HELPER_FAILED = 125  # like `env` and container runtimes: the wrapper failed, not the command


def _warn(message: str) -> None:
    sys.stderr.write(f"jit-broker: {message}\n")
    sys.stderr.flush()


def _unix(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC).timestamp())


# --- git ------------------------------------------------------------------------------------


def read_credential_description(stream: TextIO) -> dict[str, list[str]]:
    """git's key=value lines up to a blank line or EOF; `key[]` keys may repeat (wwwauth[], capability[])."""
    attrs: dict[str, list[str]] = {}
    for raw in stream:
        line = raw.rstrip("\n").rstrip("\r")
        if not line:
            break
        key, sep, value = line.partition("=")
        if not sep:
            continue  # git never sends this; ignore rather than fail the operation
        if key.endswith("[]"):
            if value:
                attrs.setdefault(key, []).append(value)
            else:
                attrs.pop(key, None)  # git: an empty value clears the list so far
        else:
            attrs[key] = [value]
    return attrs


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback(host: str) -> bool:
    name = _host_name(host).lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_git_hosts() -> set[str]:
    return {h.strip().lower() for h in os.environ.get(GIT_HOSTS_ENV, DEFAULT_GIT_HOSTS).split(",") if h.strip()}


@dataclass(frozen=True)
class GitTarget:
    owner: str
    repo: str

    @property
    def resource(self) -> str:
        return f"github://{self.owner}/{self.repo}"


def git_target(attrs: dict[str, list[str]]) -> GitTarget | str:
    """The repository git is talking to, or why the helper stays silent for this request."""
    protocol = (attrs.get("protocol") or [""])[0].lower()
    host = (attrs.get("host") or [""])[0].lower()
    if host not in allowed_git_hosts():
        return f"host {host or '?'} is not in {GIT_HOSTS_ENV}"
    # A token never travels in clear text, except to this machine (local mirrors, tests).
    if protocol != "https" and not (protocol == "http" and _is_loopback(host)):
        return f"protocol {protocol or '?'} is not https"
    path = (attrs.get("path") or [""])[0].strip("/")
    if not path:
        return "git sent no repository path: run `git config --global credential.useHttpPath true`"
    parts = path.removesuffix(".git").split("/")
    if len(parts) != 2 or not all(_REPO_PART.match(p) for p in parts):
        return f"path {path!r} is not owner/repository"
    return GitTarget(parts[0], parts[1])


def git_credential_get(attrs: dict[str, list[str]], access: str, ttl: int | None, out: TextIO) -> None:
    target = git_target(attrs)
    if isinstance(target, str):
        if "useHttpPath" in target:
            _warn(target)
        return  # not ours: git asks its next helper, or the user
    try:
        cap = AgentClient.from_environment().request_capability(
            target.resource, access, purpose=f"git over {(attrs.get('protocol') or ['?'])[0]} for {target.resource}",
            tool="git-credential", ttl_seconds=ttl)
    except HelperError as exc:
        _warn(f"no git credential for {target.resource} ({access}): {exc.message}")
        if exc.code not in ("broker-unreachable", "no-session-token"):
            # The broker said no: stop git from prompting for a password nobody should type.
            out.write("quit=1\n")
        return
    credential = cap.get("credential") or {}
    if credential.get("type") != "github_token" or not credential.get("token"):
        _warn(f"{target.resource} is not served by the github provider (got {credential.get('type')})")
        out.write("quit=1\n")
        return
    # The lease, not GitHub's one hour, is when the broker revokes the token.
    out.write(f"username={GIT_USERNAME}\npassword={credential['token']}\n"
              f"password_expiry_utc={_unix(cap['expires_at'])}\n")


def git_credential_erase(attrs: dict[str, list[str]]) -> None:
    """git erases a credential the server refused: revoke it at the broker too (it is dead weight)."""
    password = (attrs.get("password") or [""])[0]
    if not password or isinstance(git_target(attrs), str):
        return
    client = AgentClient.from_environment()
    wanted = fingerprint(password)
    for cap in client.capabilities("active"):
        if cap.get("credential_fingerprint") == wanted:
            client.revoke(cap["capability_id"])
            _warn(f"revoked {cap['capability_id']} after git erased its token")


def git_credential(
    operation: Annotated[str, typer.Argument(help="get, store or erase (git passes it); others are ignored")],
    access: Annotated[str | None, typer.Option(help=f"access asked for (default ${GIT_ACCESS_ENV} or read)")] = None,
    ttl: Annotated[int | None, typer.Option(parser=parse_duration, metavar="DURATION",
                                            help="requested lifetime, e.g. 10m (default: the tier's)")] = None,
) -> None:
    """git credential helper: a short-lived GitHub token for the repository git talks to."""
    attrs = read_credential_description(sys.stdin)
    try:
        if operation == "get":
            chosen = access or os.environ.get(GIT_ACCESS_ENV) or DEFAULT_GIT_ACCESS
            git_credential_get(attrs, chosen, ttl, sys.stdout)
        elif operation == "erase":
            git_credential_erase(attrs)
        # store: nothing to keep; the broker holds the lease and git asks again next time.
    except HelperError as exc:
        _warn(exc.message)
    sys.stdout.flush()


# --- AWS ------------------------------------------------------------------------------------


def aws_credential_process(
    resource: Annotated[str, typer.Option(help="aws://ACCOUNT/role/NAME")],
    access: Annotated[str, typer.Option(help="access name in the policy, e.g. read")],
    ttl: Annotated[int | None, typer.Option(parser=parse_duration, metavar="DURATION",
                                            help="requested lifetime, e.g. 1h (STS: at least 15m)")] = None,
) -> None:
    """AWS `credential_process`: STS credentials for one capability, as the SDKs expect them."""
    try:
        cap = AgentClient.from_environment().request_capability(
            resource, access, purpose=f"AWS SDK credential_process for {resource}", tool="aws-credential-process",
            ttl_seconds=ttl)
    except HelperError as exc:
        _warn(exc.message)
        raise typer.Exit(1) from None
    credential = cap.get("credential") or {}
    if credential.get("type") != "aws_sts":
        _warn(f"{resource} is not served by the aws provider (got {credential.get('type')})")
        raise typer.Exit(1)
    # The SDK refreshes at Expiration: the lease's end, when the broker revokes the session.
    print(json.dumps({
        "Version": 1,
        "AccessKeyId": credential["access_key_id"],
        "SecretAccessKey": credential["secret_access_key"],
        "SessionToken": credential["session_token"],
        "Expiration": cap["expires_at"],
    }))


# --- exec -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapabilitySpec:
    resource: str
    access: str
    name: str  # for BROKER_TOKEN_<NAME> and BROKER_SECRET_<NAME>_<KEY>

    @classmethod
    def parse(cls, text: str) -> CapabilitySpec:
        """RESOURCE=ACCESS[@NAME]; NAME defaults to the resource's last path segment."""
        resource, sep, rest = text.rpartition("=")
        access, _, name = rest.partition("@")
        if not sep or "://" not in resource or not access:
            raise typer.BadParameter(f"{text!r}: use RESOURCE=ACCESS[@NAME], e.g. jwt://payments-api=read")
        name = name or resource.rstrip("/").rsplit("/", 1)[-1]
        return cls(resource, access, re.sub(r"[^A-Z0-9]", "_", name.upper()).strip("_") or "TOKEN")


def credential_environment(cap: dict[str, Any], name: str) -> dict[str, str]:
    """The variables the usual tools read, for one capability's credential."""
    c = cap.get("credential") or {}
    kind = c.get("type")
    if kind == "github_token":
        return {"GH_TOKEN": c["token"], "GITHUB_TOKEN": c["token"]}
    if kind == "aws_sts":
        env = {"AWS_ACCESS_KEY_ID": c["access_key_id"], "AWS_SECRET_ACCESS_KEY": c["secret_access_key"],
               "AWS_SESSION_TOKEN": c["session_token"], "AWS_CREDENTIAL_EXPIRATION": cap["expires_at"]}
        if c.get("region"):
            env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = c["region"]
        return env
    if kind == "vault_token":
        env = {"VAULT_ADDR": c["vault_addr"], "VAULT_TOKEN": c["token"], "BAO_ADDR": c["vault_addr"], "BAO_TOKEN": c["token"]}
        if c.get("vault_namespace"):
            env["VAULT_NAMESPACE"] = env["BAO_NAMESPACE"] = c["vault_namespace"]
        return env
    if kind == "vault_secret":
        data = c.get("data") or {}
        return {f"BROKER_SECRET_{name}_{re.sub(r'[^A-Z0-9]', '_', str(k).upper())}": str(v) for k, v in data.items()}
    if kind == "jwt":
        return {f"BROKER_TOKEN_{name}": c["token"]}
    raise HelperError(f"{cap.get('resource')}: no environment mapping for credential type {kind!r}", "unknown-credential")


class _Forwarder:
    """Signals sent to `exec` go to the child; they never kill `exec` before it revokes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.pending: list[int] = []
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Forwarder:
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.child is None:
            self.pending.append(signum)  # arrived before the child existed: deliver once it does
        elif self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signum)

    def attach(self, child: subprocess.Popen[bytes]) -> None:
        self.child = child
        for signum in self.pending:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _revoke_all(client: AgentClient, caps: Iterable[dict[str, Any]]) -> bool:
    ok = True
    for cap in caps:
        try:
            answer = client.revoke(cap["capability_id"])
        except HelperError as exc:
            ok = False
            _warn(f"could not revoke {cap['capability_id']} ({exc.message}); it expires at {cap['expires_at']}")
            continue
        if answer.get("status") not in ("revoked", "expired"):
            _warn(f"{cap['capability_id']} is {answer.get('status')}; the broker keeps retrying")
    return ok


def exec_command(
    command: Annotated[list[str], typer.Argument(help="the command and its arguments, after --")],
    capability: Annotated[list[str], typer.Option("--capability", "-c",
                                                  help="RESOURCE=ACCESS[@NAME], repeatable")],
    ttl: Annotated[int | None, typer.Option(parser=parse_duration, metavar="DURATION",
                                            help="requested lifetime of each capability, e.g. 10m")] = None,
    keep_session_token: Annotated[bool, typer.Option(
        help="pass BROKER_SESSION_TOKEN (and BROKER_WORKLOAD_TOKEN) to the command (default: it gets only the "
             "listed credentials)")] = False,
) -> None:
    """Run CMD with short-lived credentials in its environment; revoke them when it exits."""
    specs = [CapabilitySpec.parse(text) for text in capability]
    try:
        client = AgentClient.from_environment()
    except HelperError as exc:
        _warn(exc.message)
        raise typer.Exit(EXIT_HELPER_FAILED) from None
    granted: list[dict[str, Any]] = []
    # The runtime's own workload token goes with the session token: neither is the child's.
    agent_secrets = ("BROKER_SESSION_TOKEN", "BROKER_WORKLOAD_TOKEN")
    env = {k: v for k, v in os.environ.items() if keep_session_token or k not in agent_secrets}
    status: int | None = None
    with _Forwarder() as forwarder:
        try:
            set_by: dict[str, str] = {}
            for spec in specs:
                cap = client.request_capability(spec.resource, spec.access, ttl_seconds=ttl, tool="exec",
                                                 purpose=f"exec {os.path.basename(command[0])}")
                granted.append(cap)
                for key, value in credential_environment(cap, spec.name).items():
                    if key in set_by and set_by[key] != spec.resource:
                        raise HelperError(f"{spec.resource} and {set_by[key]} both set {key}; name one with @NAME",
                                          "environment-clash")
                    set_by[key] = spec.resource
                    env[key] = value
            if not forwarder.pending:
                try:
                    child = subprocess.Popen(command, env=env)  # noqa: S603  # the user's own command as an argv list, no shell: running it is the point
                except FileNotFoundError:
                    _warn(f"{command[0]}: command not found")
                    status = 127
                except PermissionError:
                    _warn(f"{command[0]}: permission denied")
                    status = 126
                else:
                    forwarder.attach(child)
                    returncode = child.wait()
                    # Killed by a signal: report it the way shells do.
                    status = 128 - returncode if returncode < 0 else returncode
            else:
                status = 128 + forwarder.pending[0]  # interrupted before the command started
        except HelperError as exc:
            _warn(exc.message)
            status = EXIT_HELPER_FAILED
        finally:
            _revoke_all(client, granted)
    raise typer.Exit(status if status is not None else EXIT_HELPER_FAILED)


def register(app: typer.Typer) -> None:
    """The helper commands on `broker-cli` (kept here so main.py only names them)."""
    app.command("git-credential")(git_credential)
    app.command("aws-credential-process")(aws_credential_process)
    app.command("exec", context_settings={"allow_interspersed_args": False})(exec_command)
    app.add_typer(hook_app, name="hook")
