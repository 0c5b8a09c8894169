"""`broker-cli policy check` (a local file, no broker needed) and `policy explain` (a dry run
through the broker: each layer's verdict for a request).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from broker.cli.client import call
from broker.cli.durations import parse_duration
from broker.cli.output import JsonOpt, out
from broker.display import visible

policy_app = typer.Typer(help="Check and explain policies.", no_args_is_help=True)


@policy_app.command("check")
def policy_check(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the policy file")], as_json: JsonOpt = False,
) -> None:
    """Validate a policy file; problems are shown with their line."""
    from broker.errors import PolicyError
    from broker.policy import load_policy

    try:
        compiled = load_policy(file)
    except PolicyError as exc:
        if as_json:
            out({"ok": False, "problems": exc.problems}, True)
        else:
            for p in exc.problems or [{"line": "?", "message": exc.message}]:
                typer.echo(f"{file}:{p.get('line', '?')}: {p.get('path', '')} {p['message']}".replace("  ", " "), err=True)
        raise typer.Exit(1) from exc
    out({"ok": True, "version": compiled.version}, as_json, f"{file}: ok ({compiled.version})")


def _split_scope(entry: str) -> tuple[str, list[str]]:
    resource, sep, accesses = entry.partition("=")
    names = [a.strip() for a in accesses.split(",")]
    if not sep or not resource.strip() or not all(names):
        raise typer.BadParameter(f"{entry!r} is not RESOURCE=access1,access2 (e.g. 'jwt://payments-api=read')")
    return resource.strip(), names


def _scope_entries(entries: list[str] | None) -> list[str] | None:
    for entry in entries or []:
        _split_scope(entry)
    return entries


@policy_app.command("explain")
def policy_explain(
    resource: Annotated[str, typer.Option()],
    access: Annotated[str, typer.Option()],
    session: Annotated[str | None, typer.Option(help="explain against a live session")] = None,
    human: Annotated[str | None, typer.Option()] = None,
    agent: Annotated[str | None, typer.Option()] = None,
    scope: Annotated[list[str] | None, typer.Option(help="RESOURCE=access1,access2 (repeatable)",
                                                    callback=_scope_entries)] = None,
    ttl: Annotated[int | None, typer.Option(parser=parse_duration, metavar="DURATION", help="requested ttl, e.g. 10m")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show each layer's verdict for a request (dry run, through the broker)."""
    body: dict[str, Any] = {"resource": resource, "access": access, "ttl_seconds": ttl}
    if session:
        body["session_id"] = session
    else:
        body.update(human=human, agent=agent,
                    scope=[{"resource": r, "access": accesses} for r, accesses in (_split_scope(e) for e in scope or [])])
    result = call("POST", "/v1/policy/explain", json=body)
    d = result["decision"]
    lines = [f"{d['result'].upper()}: {d['reason']} ({d.get('matched_rule')}) policy {d['policy_version'][:19]}"]
    for layer in d["layers"]:
        reason, rule = layer.get("reason") or "", layer.get("matched_rule") or ""
        lines.append(f"  {layer['layer']:<11} {layer['verdict']:<18} {reason} {rule}")
    live = d.get("human_permission")
    if live:
        cached = ", cached" if live.get("cached") else ""
        lines.append(f"live source {live['source']}: {live['verdict']}{cached}: {live['evidence'].get('summary', '')}")
    if result.get("grant"):
        g = result["grant"]
        lines.append(f"grant {g['grant_id']} by {visible(g['granted_by'])} stands in for the approval "
                     f"({g['uses_left']} {'use' if g['uses_left'] == 1 else 'uses'} left, until {g['expires_at']})")
    if result.get("shadow"):
        s = result["shadow"]
        lines.append(f"shadow would: {s['result']} ({s['reason']})")
    out(result, as_json, "\n".join(lines))
