"""`broker-cli audit`: verify the chain and the Merkle tree (and, locally, that today's log
extends a saved checkpoint its witnesses cosigned), print a checkpoint, tail and export.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.cli.client import call
from broker.cli.output import JsonOpt, out, shown
from broker.jsonbounds import dumps_stored

audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)


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
        out(r, as_json, f"AUDIT CHAIN BROKEN at {where}: {r['problem']} ({r['checked']} records before it are intact)")
        raise typer.Exit(1)
    text = (f"audit chain intact: {r['checked']} records in {r.get('chains')} chains; "
            f"tree of {r.get('tree_size')} leaves, root {r.get('root_hash')}, {r.get('unlinked')} not yet linked")
    if checkpoint is not None and policy is not None:
        r["witnesses"] = _check_witnesses(checkpoint, *policy)
        if not r["witnesses"]["ok"]:
            out(r, as_json, f"CHECKPOINT {checkpoint} IS NOT WITNESSED: {r['witnesses']['problem']}")
            raise typer.Exit(1)
        text += f"\nwitnessed: {r['witnesses']['problem']}"
    if checkpoint is not None:
        r["checkpoint"] = _prove_extends(checkpoint)
        if not r["checkpoint"]["ok"]:
            out(r, as_json, f"AUDIT LOG DOES NOT EXTEND {r['checkpoint']['name']}: {r['checkpoint']['problem']}")
            raise typer.Exit(1)
        text += f"\nextends {r['checkpoint']['name']} (consistency proof to size {r['checkpoint']['current_size']})"
    out(r, as_json, text)


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
        out(r, True, "")
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
        out(r, as_json, f"{r['seq']:>6} {shown(r['timestamp'])} {shown(r['type']):<26} {shown(r['outcome']):<16} "
                         f"{shown((r.get('request') or {}).get('resource'))} {shown(d.get('reason'))}", shown=True)


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
