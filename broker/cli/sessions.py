"""broker-cli for operators: sessions (list, show, end, resume), break-glass reviews,
capabilities (list, revoke) and the `revoke` kill switch, with the revocation receipts each
answer carries.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from broker.cli.client import call
from broker.cli.output import JsonOpt, out, shown

sessions_app = typer.Typer(help="Sessions (task runs).", no_args_is_help=True)
reviews_app = typer.Typer(help="Post-reviews of break-glass uses.", no_args_is_help=True)
caps_app = typer.Typer(help="Capabilities (leases).", no_args_is_help=True)


def _receipt_line(r: dict[str, Any]) -> str:
    """One revocation receipt, as a person reads it: what happened to the credential, and when."""
    when = {
        "revoked": f"confirmed {r.get('revoked_at')}",
        "revoke_pending": f"next try {r.get('next_attempt_at')}, lives at most until {r.get('expires_at')}",
        "expires_naturally": f"usable somewhere until {r.get('expires_at')}",
        "already_ended": f"{r.get('status')} since {r.get('ended_at')}",
    }.get(r["outcome"], "")
    return (f"  {r['capability_id']}  {r['outcome']:<17} {r['provider']:<7} {r['resource']} {r['access']}: {when}\n"
            f"      {r['detail']}")


def _receipts_text(receipts: list[dict[str, Any]]) -> str:
    if not receipts:
        return ""
    counts: dict[str, int] = {}
    for r in receipts:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    tally = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    return f"\nreceipts ({tally}):\n" + "\n".join(_receipt_line(r) for r in receipts)


@sessions_app.command("list")
def sessions_list(status: str | None = None, as_json: JsonOpt = False) -> None:
    rows = call("GET", "/v1/sessions", params={"status": status} if status else None)
    out(rows, as_json, "\n".join(f"{shown(r['session_id'])}  {shown(r['status']):<6} {shown(r['human'])} / {shown(r['agent'])}  "
                                  f"task={shown(r['task_id'])}" for r in rows) or "no sessions", shown=True)


@sessions_app.command("show")
def sessions_show(session_id: str, as_json: JsonOpt = False) -> None:
    out(call("GET", f"/v1/sessions/{session_id}"), as_json)


@sessions_app.command("end")
def sessions_end(session_id: str, reason: str = "api_teardown", as_json: JsonOpt = False) -> None:
    r = call("POST", f"/v1/sessions/{session_id}/end", json={"reason": reason})
    out(r, as_json, f"{r['session_id']} {r['status']}: {r['revoked']} finished, {r['revoke_pending']} pending"
                     + _receipts_text(r.get("receipts", [])))


@sessions_app.command("resume")
def sessions_resume(session_id: str, reason: Annotated[str | None, typer.Option(help="why it may go on")] = None,
                    as_json: JsonOpt = False) -> None:
    """Lift a suspension by the deviation tripwire (the session's human or an admin)."""
    r = call("POST", f"/v1/sessions/{session_id}/resume", json={"reason": reason} if reason else {})
    out(r, as_json, f"{shown(r['session_id'])} resumed: new capabilities may be issued again", shown=True)


@reviews_app.command("list")
def reviews_list(status: Annotated[str | None, typer.Option(help="open | closed")] = "open",
                 as_json: JsonOpt = False) -> None:
    """The break-glass uses you are named to review (admins: all), soonest due first."""
    rows = call("GET", "/v1/reviews", params={"status": status} if status else None)
    out(rows, as_json, "\n".join(
        f"{shown(r['review_id'])}  {shown(r['status'])}{' OVERDUE' if r['overdue'] else ''}  due {shown(r['due_at'])}  "
        f"{shown(r['resource'])} {shown(r['access'])}  by {shown(r['agent'])} for {shown(r['human'])}\n"
        f"      justification: {shown(r['justification'])}\n      approved by: {shown(', '.join(r['approved_by']))}"
        for r in rows) or "no reviews", shown=True)


@reviews_app.command("close")
def reviews_close(review_id: str,
                  verdict: Annotated[str, typer.Option(help="appropriate | inappropriate")],
                  note: Annotated[str | None, typer.Option(help="what the reviewer found")] = None,
                  as_json: JsonOpt = False) -> None:
    """Close one review with a verdict."""
    body: dict[str, Any] = {"verdict": verdict}
    if note:
        body["note"] = note
    r = call("POST", f"/v1/reviews/{review_id}/close", json=body)
    out(r, as_json, f"{shown(r['review_id'])} closed: {shown(r['verdict'])}", shown=True)


@caps_app.command("list")
def capabilities_list(session: str | None = None, status: str | None = None, as_json: JsonOpt = False) -> None:
    params = {k: v for k, v in {"session_id": session, "status": status}.items() if v}
    rows = call("GET", "/v1/capabilities", params=params)
    out(rows, as_json, "\n".join(f"{r['capability_id']}  {r['status']:<14} {r['resource']} {r['access']} "
                                  f"({r['tier']}, {r['provider']}) until {r['expires_at']}" for r in rows) or "none")


@caps_app.command("revoke")
def capabilities_revoke(capability_id: str, as_json: JsonOpt = False) -> None:
    r = call("DELETE", f"/v1/capabilities/{capability_id}")
    out(r, as_json, f"{r['capability_id']}: {r['status']}" + (_receipts_text([r["receipt"]]) if "receipt" in r else ""))


def revoke(
    session: Annotated[str | None, typer.Option("--session", help="a session id")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="every session of this agent")] = None,
    human: Annotated[str | None, typer.Option("--human", help="every session this human delegated")] = None,
    resource: Annotated[str | None, typer.Option("--resource", help="a resource URI or glob")] = None,
    reason: Annotated[str, typer.Option(help="recorded in the audit log")] = "kill-switch",
    end_sessions: Annotated[bool | None, typer.Option(
        "--end-sessions/--keep-sessions", help="end matched sessions too (default: yes unless --resource)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Kill switch: revoke every live capability matching all the given filters."""
    body: dict[str, Any] = {k: v for k, v in {"session_id": session, "agent": agent, "human": human,
                                              "resource": resource, "end_sessions": end_sessions}.items()
                            if v is not None}
    if not body.keys() - {"end_sessions"}:
        typer.echo("error: give at least one of --session, --agent, --human, --resource", err=True)
        raise typer.Exit(2)
    body["reason"] = reason
    r = call("POST", "/v1/revocations", json=body)
    text = (f"{r['matched_capabilities']} capabilities matched: {r['revoked']} finished, "
            f"{r['revoke_pending']} pending; {r['sessions_ended']} of {r['matched_sessions']} sessions ended")
    if r["revoke_pending_ids"]:
        text += "\npending (the broker keeps retrying): " + " ".join(r["revoke_pending_ids"])
    text += _receipts_text(r.get("receipts", []))
    out(r, as_json, text)


def register(app: typer.Typer) -> None:
    """The kill switch on `broker-cli` itself (the sub-apps are added by main.py)."""
    app.command("revoke")(revoke)
