"""Security Event Tokens: session ends and capability revocations, pushed to configured receivers.

Two CAEP events (OpenID CAEP 1.0 over the Shared Signals Framework 1.0), each a SET (RFC 8417):

- `session-revoked`, once when a session ends, whatever ended it (the API, the orchestrator's
  webhook, its deadline, the kill switch);
- `credential-change` with `change_type: revoke`, once per capability whose credential was
  handed out and is now dead: revoked (DELETE, RFC 7009, session end, kill switch, a lost live
  permission) or expired (the sweeper revokes it at the backend at `expires_at`; `status` says
  which). It is written when the backend confirmed, never on hope: a `revoke_pending`
  capability has none until its retry succeeds. A capability whose mint never completed was
  never held by anyone and has none.

One SET per event per receiver (`BROKER_SECURITY_EVENT_RECEIVERS`), written to the outbox in the
transaction that records the change, so a crash between the change and the push loses none.
The row holds the claims; the broker's active Ed25519 key signs them when they are sent
(`typ: secevent+jwt`, `kid` in the header, verifiable with `/.well-known/jwks.json`), so a retry
after a key rotation is signed with a key still published. Push is RFC 8935: `POST` with
`Content-Type: application/secevent+jwt`; 202 is delivered, 400 (`{"err", "description"}`) is
a refusal for good (`dead`), anything else is retried with backoff (broker/outbox.py).

Claims: `iss` (BROKER_ISSUER), `iat`, `jti` (unique per SET: receivers dedupe on it), `aud` (the
receiver's), `txn` (shared by the SETs of one cause: a session's end and the revocations it
caused), `sub_id` (a complex subject: the session, the delegating human, and for
credential-change the capability), `events`. No `sub`, no `exp` (SSF 1.0). Never a secret:
the credential appears only as its SHA-256 fingerprint.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from datetime import datetime
from typing import Any

import httpx
from sqlmodel import Session

from broker import outbox
from broker.config import SecurityEventReceiver
from broker.metrics import SECURITY_EVENTS
from broker.models import Lease, OutboxMessage, SessionRow
from broker.runtime import Broker
from broker.ssf import streams as ssf_streams

log = logging.getLogger("broker.security_events")

KIND = "set"
TYP = "secevent+jwt"  # RFC 8417 section 2.3: explicit typing
MEDIA_TYPE = "application/secevent+jwt"
CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
SESSION_REVOKED = CAEP + "session-revoked"
CREDENTIAL_CHANGE = CAEP + "credential-change"
# CAEP lets transmitter and receiver agree on credential types beyond its list: ours is one.
CREDENTIAL_TYPE = "jit-broker-capability"
# What the broker reads of a receiver's 400 (RFC 8935 section 2.4), for the log: bounded, printable.
_ERR_CODE = re.compile(r"^[a-z_]{1,64}$")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def initiating_entity(reason: str, actor: str) -> str:
    """CAEP's `initiating_entity`: who caused it. The reason says it best (a retry by the
    sweeper carries the reason first given); the actor's kind decides the rest."""
    if reason == "human-permission-lost":
        return "policy"  # the live permission re-check
    if reason.startswith("kill-switch") or reason.startswith("session-ended:kill-switch"):
        return "admin"
    kind = reason.removeprefix("revoked-by-") if reason.startswith("revoked-by-") else actor.partition(":")[0]
    if kind in ("admin", "human"):
        return "admin"
    if kind == "agent":
        return "user"  # the agent holding the credential gave it up
    return "system"  # the broker's own loops, the orchestrator and its webhook


def _user(human: str) -> dict[str, str]:
    return {"format": "email", "email": human} if "@" in human else {"format": "opaque", "id": human}


def session_subject(session_id: str, session: SessionRow | None) -> dict[str, Any]:
    """SSF complex subject: the session, and the human who delegated it."""
    subject: dict[str, Any] = {"format": "complex", "session": {"format": "opaque", "id": session_id}}
    if session is not None:
        subject["user"] = _user(session.human)
    return subject


def credential_subject(issuer: str, lease: Lease, session: SessionRow | None) -> dict[str, Any]:
    """The session's subject, plus the capability. A native token's `jti` is the capability id,
    so it is named as that JWT (SSF's `jwt_id`); any other credential by the capability id."""
    credential = ({"format": "jwt_id", "iss": issuer, "jti": lease.id} if lease.provider == "native"
                  else {"format": "opaque", "id": lease.id})
    return {**session_subject(lease.session_id, session), "credential": credential}


def session_txn(session_id: str) -> str:
    """A session ends once: its end and every revocation it causes share this `txn`."""
    return f"{session_id}/end"


def _reason_admin(reason: str) -> dict[str, str]:
    return {"en": reason[:256]}


def session_revoked(db: Session, broker: Broker, session: SessionRow, *, reason: str, actor: str,
                    now: datetime) -> None:
    """In the transaction that ends `session`: one session-revoked SET per receiver."""
    event = {
        "event_timestamp": int(now.timestamp()),
        "initiating_entity": initiating_entity(reason, actor),
        "reason_admin": _reason_admin(reason),
        "agent": session.agent,
        "task_id": session.task_id,
    }
    _enqueue(db, broker, "session-revoked", SESSION_REVOKED, event, session_subject(session.id, session),
             session_txn(session.id), now)


def capability_revoked(db: Session, broker: Broker, session: SessionRow | None, lease: Lease, *, reason: str,
                       actor: str, now: datetime) -> None:
    """In the transaction that finishes `lease` (revoked or expired): one credential-change SET
    per receiver, if its credential was ever handed out."""
    if lease.minted_at is None:
        return  # its mint never completed: nobody holds it, nobody to tell
    event: dict[str, Any] = {
        "credential_type": CREDENTIAL_TYPE,
        "change_type": "revoke",
        "friendly_name": f"{lease.access} on {lease.resource}",
        "event_timestamp": int(now.timestamp()),
        "initiating_entity": initiating_entity(reason, actor),
        "reason_admin": _reason_admin(reason),
        "capability_id": lease.id,
        "resource": lease.resource,
        "access": lease.access,
        "provider": lease.provider,
        "status": str(lease.status),  # revoked | expired
    }
    if lease.fingerprint:
        event["credential_fingerprint"] = lease.fingerprint  # SHA-256: the credential itself never
    txn = session_txn(lease.session_id) if reason.startswith("session-ended:") else f"{lease.id}/revoke"
    _enqueue(db, broker, "credential-change", CREDENTIAL_CHANGE, event,
             credential_subject(broker.settings.issuer, lease, session), txn, now)


BREAKGLASS = "https://jit-broker.dev/secevent/breakglass"  # the broker's own event type (SSF allows any URI)


def breakglass(db: Session, broker: Broker, session: SessionRow, *, stage: str, detail: dict[str, Any],
               now: datetime) -> None:
    """A break-glass request or use (`stage`: requested | used), loud: one SET per receiver."""
    event = {"event_timestamp": int(now.timestamp()), "stage": stage, "agent": session.agent,
             "task_id": session.task_id, **detail}
    _enqueue(db, broker, f"breakglass-{stage}", BREAKGLASS, event, session_subject(session.id, session),
             session_txn(session.id), now)


def _enqueue(db: Session, broker: Broker, short: str, uri: str, event: dict[str, Any], subject: dict[str, Any],
             txn: str, now: datetime) -> None:
    # Streams receivers manage themselves (SSF 1.0), then the receivers in the configuration.
    ssf_streams.fan_out(db, broker, uri, event, subject, txn, now)
    receivers = broker.settings.security_event_receiver_list()
    if not receivers:
        return
    event_id = "sev_" + secrets.token_hex(12)  # the same for every receiver's copy, for logs
    for receiver in receivers:
        claims = {
            "iss": broker.settings.issuer,
            "iat": int(now.timestamp()),
            "jti": secrets.token_hex(16),
            "aud": receiver.audience,
            "txn": txn,
            "sub_id": subject,
            "events": {uri: event},
        }
        outbox.add(db, kind=KIND, event_id=event_id, type_=short, url=receiver.url, receiver=receiver.name,
                   body=json.dumps(claims, sort_keys=True, separators=(",", ":")), now=now)
        SECURITY_EVENTS.labels(event=short).inc()


def sign(broker: Broker, message: OutboxMessage) -> str:
    """The compact SET for one outbox row, signed now with the active key."""
    return broker.keyring.sign(json.loads(message.body), typ=TYP)


def _refusal(response: httpx.Response) -> str:
    """RFC 8935's error body, for the log: `err` if it is a code, `description` printable and short."""
    try:
        body = response.json()
    except ValueError:
        return "HTTP 400 (no RFC 8935 error body)"
    if not isinstance(body, dict):
        return "HTTP 400 (no RFC 8935 error body)"
    err = body.get("err")
    err = err if isinstance(err, str) and _ERR_CODE.match(err) else "unknown"
    description = body.get("description")
    text = _UNPRINTABLE.sub("?", description[:200]) if isinstance(description, str) else ""
    return f"HTTP 400 {err}: {text}" if text else f"HTTP 400 {err}"


def _receiver(broker: Broker, name: str | None) -> SecurityEventReceiver | None:
    return next((r for r in broker.settings.security_event_receiver_list() if r.name == name), None)


def deliver(broker: Broker, message: OutboxMessage, client: httpx.Client) -> outbox.Attempt:
    """One RFC 8935 push to the receiver as configured now (URL and token)."""
    receiver = _receiver(broker, message.receiver)
    if receiver is None:
        # Taken out of the configuration: it is told nothing more.
        return outbox.Attempt(f"receiver {message.receiver!r} is no longer configured", permanent=True)
    headers = {"Content-Type": MEDIA_TYPE, "Accept": "application/json"}
    if receiver.token:
        headers["Authorization"] = f"Bearer {receiver.token}"
    try:
        response = client.post(receiver.url, content=sign(broker, message).encode(), headers=headers)
    except httpx.HTTPError as exc:
        return outbox.Attempt(exc.__class__.__name__)
    if response.status_code == 202:
        return outbox.DELIVERED
    if 200 <= response.status_code < 300:
        # It took the SET; RFC 8935 says 202. Sending it again would only make a duplicate.
        log.warning("receiver %s answered %d to SET %s; RFC 8935 expects 202", receiver.name, response.status_code,
                    message.event_id)
        return outbox.DELIVERED
    if response.status_code == 400:
        return outbox.Attempt(_refusal(response), permanent=True)  # RFC 8935 2.4: sending it again changes nothing
    return outbox.Attempt(f"HTTP {response.status_code}")
