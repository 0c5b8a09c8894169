"""`broker-cli serve` as a real subprocess, for the fault tests (and bench/): start, SIGKILL, start again.

The environment comes from `BrokerSecrets.env(...)`; `migrate()` runs `broker-cli migrate`
first, as an operator would. Each process logs to its own file, shown when a start fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from tests.support.children import die_with_parent, terminate
from tests.support.ports import free_port

BROKER_CLI = str(Path(sys.executable).parent / "broker-cli")


# What a broker subprocess must not inherit from the test process: its own settings (each test
# gives them), and the SDKs' variables other fixtures leave in os.environ. The moto fixture's
# dummy AWS_* keys would make `broker-cli dev` configure its aws provider against the real STS
# (unreachable here: never ready); VAULT_*/BAO_* would point hvac and `bao` at another OpenBao.
NOT_INHERITED = ("BROKER_", "AWS_", "VAULT_", "BAO_")


def broker_environ(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a `broker-cli dev`/`serve`/`migrate` subprocess: this process's
    without NOT_INHERITED, plus exactly what the test gives in `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(NOT_INHERITED)}
    return {**base, **(env or {})}


def wait_until_ready(proc: subprocess.Popen[Any], url: str, log: Path, *, within: float = 60) -> None:
    """Poll `url`/readyz until it answers 200; fail with the process's log if it exits or `within`
    seconds pass (a bound on a hang on a busy machine, not a timing assertion)."""
    deadline = time.monotonic() + within
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def _environ(env: dict[str, str]) -> dict[str, str]:
    return broker_environ({"BROKER_LOG_LEVEL": "warning", **env})


def migrate(env: dict[str, str]) -> None:
    out = subprocess.run([BROKER_CLI, "migrate"], env=_environ(env), capture_output=True, timeout=120, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"broker-cli migrate failed:\n{out.stdout.decode()}\n{out.stderr.decode()}")


class BrokerProcess:
    """One `broker-cli serve` on a fixed loopback port (kept across restarts).

    `command` replaces `broker-cli serve` (a profiler wrapper, say); `death_signal` is what the
    process gets if this one dies (SIGKILL for fault tests: nothing to clean up for)."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "broker", serve_args: tuple[str, ...] = (),
                 *, cwd: Path | None = None, death_signal: signal.Signals = signal.SIGKILL) -> None:
        self.port = free_port()
        self.env = {**env, "BROKER_HOST": "127.0.0.1", "BROKER_PORT": str(self.port)}
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        self.command = [BROKER_CLI, "serve", *serve_args]
        self.cwd = cwd
        self.death_signal = death_signal
        self.proc: subprocess.Popen[bytes] | None = None
        self.name = name

    def migrate(self) -> None:
        migrate(self.env)

    def start(self, timeout: float = 60.0) -> BrokerProcess:
        """Launch and wait until it serves (after its lifespan: reconciliation, then the sweeper)."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        assert not self.running, "already running"
        with open(self.log_path, "ab") as logf:
            logf.write(f"--- start {time.strftime('%H:%M:%S')} ---\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(self.command, env=_environ(self.env), stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.cwd,
                                         preexec_fn=die_with_parent(self.death_signal))

    def wait_ready(self, timeout: float = 60.0) -> BrokerProcess:
        assert self.proc is not None, "not launched"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{self.name} did not answer /healthz within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no lifespan shutdown, no flushing, claims and `minting` rows left as they are."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        terminate(proc, grace=15)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kw.pop("timeout", 30), **kw)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
