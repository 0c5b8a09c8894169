"""broker-cli: run the broker, and talk to it as a human, an operator or a script.

Every command but serve, dev, migrate, init, keys and `policy check` speaks to the REST API
(BROKER_URL, BROKER_TOKEN); none touches the database behind the broker's back.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from broker.cli import helpers, humans, login, server, sessions
from broker.cli.audit import audit_app
from broker.cli.client import call
from broker.cli.policy import policy_app
from broker.cli.server import keys_app
from broker.cli.sessions import caps_app, reviews_app, sessions_app

# Plain click errors (`Error: ...` under the usage line), not a drawn box: one line a script can grep.
app = typer.Typer(help="jit-broker: just-in-time credentials for AI coding agents.", no_args_is_help=True,
                  rich_markup_mode=None, pretty_exceptions_enable=False)
for sub, name in ((policy_app, "policy"), (sessions_app, "sessions"), (reviews_app, "reviews"),
                  (caps_app, "capabilities"), (audit_app, "audit"), (keys_app, "keys")):
    app.add_typer(sub, name=name)
humans.register(app)  # approvals list|show, approve, deny, grant, and --as
server.register(app)  # serve, dev, migrate, init: broker/cli/server.py
sessions.register(app)  # revoke (the kill switch): broker/cli/sessions.py
helpers.register(app)
login.register(app)  # login, logout: broker/cli/login.py


@app.command()
def whoami(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Who the broker sees with the credentials this CLI sends."""
    me = call("GET", "/v1/whoami")
    typer.echo(json.dumps(me) if as_json else login.describe(me) + "\n" + _credential_source())


def _credential_source() -> str:
    """Where the CLI took the token it sent, so a surprise identity has an explanation."""
    import os

    from broker.cli.client import token_source

    source = token_source()
    hint = ""
    if os.environ.get("BROKER_AS") is None and source.endswith("admin-token"):
        hint = "; to act as the person of `broker-cli dev`, add --as human"
    return f"  token from {source}{hint}"


def main() -> None:
    """The console script. Typer prints usage errors itself (exit 2); anything unforeseen is one
    line too, never a traceback (BROKER_CLI_DEBUG=1 shows it, for a bug report)."""
    import os

    try:
        app()  # click turns usage errors, typer.Exit and ^C into exit codes itself
    except Exception as exc:
        if os.environ.get("BROKER_CLI_DEBUG"):
            raise
        typer.echo(f"error: unexpected {type(exc).__name__}: {exc} (a bug: BROKER_CLI_DEBUG=1 shows where)", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
