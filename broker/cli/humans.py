"""broker-cli for the humans who delegate and approve: approvals list|show, approve, deny, grant.

REST only. Readable tables by default, `--json` for scripts. Exit codes:

    0  done
    1  the broker refused (403 denied, 409 conflict: not yours to decide, already decided, expired...)
    2  usage error, or the broker cannot be reached
    3  not found (or not visible to you: ids are no oracle)
    4  not signed in (401): log in, or choose an identity with --as / BROKER_TOKEN

Identity: humans' commands use the local human token (`.broker/human-token`, written by
`broker-cli dev`) unless `BROKER_TOKEN` or `--as` says otherwise.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer

from broker.cli.client import IDENTITIES, request
from broker.cli.durations import parse_duration
from broker.display import visible
from broker.jsonbounds import loads_stored

approvals_app = typer.Typer(help="Requests waiting for a human's approval.", no_args_is_help=True)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNAUTHENTICATED = 0, 1, 2, 3, 4
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="recorded in the audit log and sent to the agent")]

# What to do next, by the broker's error code.
HINTS = {
    "missing-credentials": "sign in (`broker-cli login`), or on `broker-cli dev` use the local human token "
                           "(`broker-cli --as human ...`), or set BROKER_TOKEN",
    "invalid-token": "your token was not accepted: sign in again, or check BROKER_TOKEN / --as",
    "approver-must-be-human": "decide as a person: `broker-cli --as human ...` or BROKER_TOKEN with your own token",
    "granter-must-be-human": "grant as a person: `broker-cli --as human ...` or BROKER_TOKEN with your own token",
    "approval-not-found": "check the id with `broker-cli approvals list --status all`; you see approvals you may "
                          "decide and those of sessions you delegated",
    "session-not-found": "check the session id (`broker-cli sessions list`); you may grant only where the tier "
                         "names you as an approver",
    "self-approval-forbidden": "ask another approver the tier names (`broker-cli approvals show ID` lists them)",
    "not-an-approver": "ask one of the approvers the tier names (`broker-cli approvals show ID` lists them)",
    "approver-lacks-permission": "approvers must hold the access themselves; ask an approver who does",
    "already-decided": "your decision is recorded; the tier needs another approver to add theirs",
    "approval-expired": "it expired before it was decided; the agent has to ask again",
    "approval-not-pending": "it is already decided; a denial is final, an approval is single use",
    "needs-more-approvers": "approve the pending request instead (`broker-cli approve ID`), with the other approvers",
}


def _identity_env() -> None:
    if os.environ.get("BROKER_AS") and os.environ["BROKER_AS"] not in IDENTITIES:
        typer.echo(f"error: --as must be one of {', '.join(IDENTITIES)}", err=True)
        raise typer.Exit(EXIT_USAGE)


def choose_identity(
    as_: Annotated[str | None, typer.Option("--as", help="which local identity to use on `broker-cli dev`: "
                                            "human or admin (default: what the command is for)")] = None,
) -> None:
    """jit-broker: just-in-time credentials for AI coding agents."""
    if as_ is not None:
        os.environ["BROKER_AS"] = as_
    _identity_env()


def _call(method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None,
          timeout: float = 30) -> Any:
    _identity_env()
    response = request(method, path, json=json_body, params=params, identity="human", timeout=timeout)
    if response.status_code < 400:
        return loads_stored(response.content) if response.content else None
    try:
        err = response.json().get("error", {})
    except ValueError:
        err = {}
    code = err.get("code", f"http-{response.status_code}")
    typer.echo(f"error: {code}: {err.get('message', response.text[:300])}", err=True)
    hint = HINTS.get(code)
    if hint:
        typer.echo(f"  next: {hint}", err=True)
    status = response.status_code
    raise typer.Exit(EXIT_UNAUTHENTICATED if status == 401 else EXIT_NOT_FOUND if status == 404
                     else EXIT_USAGE if status in (400, 422) else EXIT_REFUSED)


def _emit(data: Any, as_json: bool, text: str) -> None:
    # --json is ASCII: every non-ASCII character, the invisible and direction-changing ones
    # included, leaves as a \uXXXX escape, exact for a program and visible to a person.
    typer.echo(json.dumps(data, indent=2, default=str, ensure_ascii=True) if as_json else text)


def _v(value: Any) -> str:
    """Text from the broker (written by an agent, an orchestrator or a person) for the terminal:
    invisible, direction-changing and control characters (terminal escapes too) shown as ⟦U+XXXX⟧."""
    return visible("-" if value is None else str(value))


def _short_time(value: str | None) -> str:
    """A time as the broker sent it: RFC 3339 in UTC with its `Z`, so nobody reads it as local time."""
    return value or "-"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _you(a: dict[str, Any]) -> str:
    if a.get("you_may_approve"):
        return "may approve"
    return _v(a.get("why_not") or "-")


@approvals_app.command("list")
def approvals_list(
    status: Annotated[str, typer.Option(help="pending, approved, denied, expired, used, or all")] = "pending",
    limit: Annotated[int, typer.Option(min=1, max=500)] = 100,
    as_json: JsonOpt = False,
) -> None:
    """What waits for you: approvals you may decide, and those your own sessions wait on."""
    params: dict[str, Any] = {"limit": limit}
    if status != "all":
        params["status"] = status
    rows = _call("GET", "/v1/approvals", params=params)
    if not rows:
        _emit(rows, as_json, f"no {'' if status == 'all' else status + ' '}approvals for you")
        return
    table = [[_v(a["approval_id"]), _v(a["status"]), _v(a["tier"]), f"{_v(a['access'])} on {_v(a['resource'])}",
              f"{_v(a.get('agent'))} for {_v(a.get('human'))}",
              f"{len([v for v in a['approvals'] if v['decision'] == 'approve'])}/{a['min_approvals']}",
              _short_time(a["expires_at"]), _you(a)] for a in rows]
    _emit(rows, as_json, _table(table, ["ID", "STATUS", "TIER", "REQUEST", "AGENT", "APPROVALS", "EXPIRES", "YOU"]))


def _display(a: dict[str, Any]) -> dict[str, Any]:
    shown: dict[str, Any] = a.get("display") or {}
    return shown


def _details(a: dict[str, Any]) -> str:
    """One approval as a person reads it before deciding: the sentence, the binding code and the
    parameters' canonical JSON (what the hash binds), every agent-written field made visible."""
    d = _display(a)
    votes = "; ".join(f"{v['decision']} by {_v(v['approver'])}" + (f" ({_v(v['reason'])})" if v.get("reason") else "")
                      for v in a["approvals"]) or "none yet"
    labels = ", ".join(f"{_v(k)}={_v(v)}" for k, v in sorted((a.get("labels") or {}).items())) or "-"
    params = a.get("parameters")
    canonical = d.get("parameters_canonical") if d else None
    if canonical is None and params is not None:
        canonical = _v(json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
    lines = [f"{_v(a['approval_id'])}  {_v(a['status']).upper()}"]
    if d.get("warning"):
        lines.append(f"  WARNING:    {d['warning']}")
    lines += [
        f"  {d.get('sentence') or _v(a.get('binding_message') or '')}",
        f"  binding:    {d.get('binding_code') or '-'}  ({_v(a['request_hash'])})",
        f"  parameters: {canonical if canonical is not None else 'null'}",
        f"  request:    {_v(a['access'])} on {_v(a['resource'])} (tier {_v(a['tier'])}, ttl {a['ttl_seconds']}s)",
        f"  tool:       {_v(a.get('tool'))}",
        f"  purpose:    {_v(a['purpose'])}",
        f"  session:    {_v(a['session_id'])} (agent {_v(a.get('agent'))}, task {_v(a.get('task_id'))}, "
        f"human {_v(a.get('human'))})",
        f"  labels:     {labels}",
        f"  message:    {_v(a.get('binding_message'))}",
        f"  why:        {_v(a['reason'])}",
        f"  approvers:  {', '.join(_v(x) for x in a['approvers'])} (needs {a['min_approvals']})",
        f"  decisions:  {votes}",
        f"  expires:    {_short_time(a['expires_at'])}",
    ]
    if a.get("capability_id"):
        lines.append(f"  used for:   {_v(a['capability_id'])} at {_short_time(a.get('used_at'))}")
    if a.get("you_may_approve") is not None:
        lines.append(f"  you:        {_you(a)}")
    return "\n".join(lines)


@approvals_app.command("show")
def approvals_show(
    approval_id: str,
    wait: Annotated[int, typer.Option(min=0, max=300, help="wait up to N seconds while it is pending")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """One approval with its full parameters and binding."""
    a = _call("GET", f"/v1/approvals/{approval_id}", params={"wait": wait} if wait else None, timeout=wait + 30)
    _emit(a, as_json, _details(a))


def _decide(approval_id: str, verb: str, reason: str | None, as_json: bool, binding: str | None = None) -> None:
    # What is decided is what is shown: read the approval, show it, send back its hash. A request
    # that changed in between (or a --binding that differs from the agent's screen) decides nothing.
    shown = _call("GET", f"/v1/approvals/{approval_id}")
    code = _display(shown).get("binding_code")
    if binding is not None and binding.strip().upper() != (code or "").upper():
        typer.echo(f"error: binding-mismatch: this approval's binding code is {code}, not {_v(binding)}; "
                   "nothing was decided", err=True)
        raise typer.Exit(EXIT_REFUSED)
    if not as_json:
        typer.echo(_details(shown))
    body: dict[str, Any] = {"request_hash": shown["request_hash"]}
    if reason:
        body["reason"] = reason
    a = _call("POST", f"/v1/approvals/{approval_id}/{verb}", json_body=body)
    if a["status"] == "pending":
        got = len([v for v in a["approvals"] if v["decision"] == "approve"])
        text = f"{approval_id}: your approval is recorded ({got} of {a['min_approvals']}); it waits for another approver"
    else:
        text = f"{approval_id}: {a['status']} ({_v(a['access'])} on {_v(a['resource'])} for {_v(a.get('agent'))})"
        if a["status"] == "approved":
            text += "; the agent may now retry its request with this approval_id"
    _emit(a, as_json, text)


BindingOpt = Annotated[str | None, typer.Option(
    "--binding", help="the binding code the agent's screen shows (e.g. 1A2B-3C4D): decide only if it matches")]


def approve(approval_id: str, reason: ReasonOpt = None, binding: BindingOpt = None, as_json: JsonOpt = False) -> None:
    """Show a pending request, then approve exactly it (it mints once, for exactly the request shown)."""
    _decide(approval_id, "approve", reason, as_json, binding)


def deny(approval_id: str, reason: ReasonOpt = None, as_json: JsonOpt = False) -> None:
    """Deny a pending request; a denial is final for that request."""
    _decide(approval_id, "deny", reason, as_json)


def parse_ttl(text: str) -> int:
    return parse_duration(text)


def grant(
    approval_id: Annotated[str | None, typer.Argument(help="a pending approval to approve")] = None,
    session: Annotated[str | None, typer.Option("--session", help="the session to pre-approve for")] = None,
    resource: Annotated[str | None, typer.Option("--resource")] = None,
    access: Annotated[str | None, typer.Option("--access")] = None,
    ttl: Annotated[str | None, typer.Option("--ttl", help="how long the grant stands, e.g. 10m")] = None,
    uses: Annotated[int, typer.Option("--uses", min=1, max=100, help="capabilities it may mint")] = 1,
    reason: ReasonOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """`grant <approval-id>` approves a pending request; `grant --session S --resource R --access A
    --ttl 10m [--uses N]` pre-approves capabilities for one session."""
    if approval_id is not None:
        if any(v is not None for v in (session, resource, access, ttl)):
            typer.echo("error: give either an approval id or --session/--resource/--access/--ttl, not both", err=True)
            raise typer.Exit(EXIT_USAGE)
        _decide(approval_id, "approve", reason, as_json)
        return
    missing = [name for name, v in (("--session", session), ("--resource", resource), ("--access", access),
                                    ("--ttl", ttl)) if v is None]
    if missing:
        typer.echo(f"error: missing {', '.join(missing)} (or give a pending approval id)", err=True)
        raise typer.Exit(EXIT_USAGE)
    assert ttl is not None  # noqa: S101  # type narrowing only: a missing --ttl exited just above
    body = {"session_id": session, "resource": resource, "access": access, "ttl_seconds": parse_ttl(ttl),
            "uses": uses, "reason": reason}
    g = _call("POST", "/v1/grants", json_body={k: v for k, v in body.items() if v is not None})
    _emit(g, as_json, f"{g['grant_id']}: {_v(g['access'])} on {_v(g['resource'])} pre-approved for {g['session_id']}, "
                      f"{g['uses_left']} {'use' if g['uses_left'] == 1 else 'uses'}, until {_short_time(g['expires_at'])}")


def register(app: typer.Typer) -> None:
    """Add the humans' verbs and the --as identity option to broker-cli."""
    app.callback()(choose_identity)
    app.add_typer(approvals_app, name="approvals")
    app.command("approve")(approve)
    app.command("deny")(deny)
    app.command("grant")(grant)
