"""SSF 1.0 streams: create, read, update, delete; status; subjects; verification; push and poll.

Receivers authenticate with a bearer token from `BROKER_SSF_RECEIVER_TOKENS` (stored hashed).
A stream belongs to the receiver that created it; every operation looks it up by (stream id,
receiver), so another receiver's stream is "not found" (404), never "forbidden": no oracle for
which stream ids exist.

Events: `security_events` calls `fan_out` in the transaction that ends a session or revokes a
capability; each enabled stream that asked for the event type (and, if it added subjects, is
about one of them) gets one SET:

- push (RFC 8935): an outbox row of kind `ssf`, sent by `deliver` (the SET signed at send time,
  `Authorization` the header the receiver gave, kept sealed with AES-256-GCM);
- poll (RFC 8936): a row in `ssf_events`, handed out by `poll` until the receiver acknowledges it.

A paused stream's events wait in `ssf_events` too; enabling a push stream again moves them to the
outbox. A disabled stream gets nothing.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import delete, func
from sqlmodel import Session, col, select

from broker import outbox
from broker.audit import service as audit
from broker.audit.events import AuditEvent, RequestRef
from broker.db import transaction, utcnow
from broker.errors import Conflict, InvalidRequest, NotFound
from broker.identity.ratelimit import RateLimited
from broker.models import OutboxMessage, SsfEvent, SsfStream, SsfSubject

if TYPE_CHECKING:
    from broker.runtime import Broker

log = logging.getLogger("broker.ssf")

KIND = "ssf"
PUSH = "urn:ietf:rfc:8935"
POLL = "urn:ietf:rfc:8936"
CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
SESSION_REVOKED = CAEP + "session-revoked"
CREDENTIAL_CHANGE = CAEP + "credential-change"
VERIFICATION = "https://schemas.openid.net/secevent/ssf/event-type/verification"
EVENTS_SUPPORTED = [SESSION_REVOKED, CREDENTIAL_CHANGE]
STATUSES = ("enabled", "paused", "disabled")
MEDIA_TYPE = "application/secevent+jwt"
MIN_VERIFICATION_INTERVAL = 15  # seconds between two verification requests a receiver may make


def new_stream_id() -> str:
    return "ssf_" + secrets.token_hex(12)


def subject_key(subject: dict[str, Any]) -> str:
    return json.dumps(subject, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _simple_subjects(sub_id: dict[str, Any]) -> set[str]:
    """The subject itself, and each simple subject a complex one holds (session, user, credential)."""
    keys = {subject_key(sub_id)}
    if sub_id.get("format") == "complex":
        for member in sub_id.values():
            if isinstance(member, dict):
                keys.add(subject_key(member))
    return keys


@dataclass(frozen=True)
class StreamUpdate:
    events_requested: list[str] | None = None
    description: str | None = None
    endpoint_url: str | None = None
    authorization_header: str | None = None


def _audit(db: Session, receiver: str, what: str, stream: SsfStream, **detail: Any) -> None:
    """Who receives security events, and how, is recorded like any other grant of information."""
    audit.append(db, AuditEvent(
        type=f"ssf.stream-{what}", outcome=what, actor=f"ssf-receiver:{receiver}",
        request=RequestRef(operation=f"ssf.stream.{what}"),
        detail={"stream_id": stream.id, "delivery_method": stream.delivery_method,
                "endpoint_url": stream.endpoint_url, "events_delivered": stream.events_delivered,
                "status": stream.status, **detail}))


def _get(db: Session, receiver: str, stream_id: str, *, lock: bool = False) -> SsfStream:
    stmt = select(SsfStream).where(SsfStream.id == stream_id, SsfStream.receiver == receiver)
    row = db.exec(stmt.with_for_update() if lock else stmt).first()
    if row is None:
        # The same answer whether it does not exist or is another receiver's.
        raise NotFound("no such stream", code="stream-not-found")
    return row


def delivered(requested: list[str]) -> list[str]:
    return [e for e in EVENTS_SUPPORTED if e in requested]


def create(broker: Broker, receiver: str, *, method: str, endpoint_url: str | None, authorization_header: str | None,
           events_requested: list[str], description: str | None) -> SsfStream:
    now = utcnow()
    stream_id = new_stream_id()
    with transaction(broker.engine) as db:
        count = db.exec(select(func.count()).select_from(SsfStream).where(SsfStream.receiver == receiver)).one()
        if count >= broker.settings.ssf_max_streams_per_receiver:
            raise Conflict(f"a receiver has at most {broker.settings.ssf_max_streams_per_receiver} streams",
                           code="too-many-streams")
        row = SsfStream(
            id=stream_id, receiver=receiver, audience=receiver, description=description, delivery_method=method,
            endpoint_url=endpoint_url if method == PUSH else None,
            authorization_header=(broker.sealer.seal(authorization_header, stream_id)
                                  if authorization_header and method == PUSH else None),
            events_requested=list(dict.fromkeys(events_requested)), events_delivered=delivered(events_requested),
            status="enabled", created_at=now, updated_at=now)
        db.add(row)
        _audit(db, receiver, "created", row)
    return row


def read(broker: Broker, receiver: str, stream_id: str) -> SsfStream:
    with transaction(broker.engine) as db:
        return _get(db, receiver, stream_id)


def list_streams(broker: Broker, receiver: str) -> list[SsfStream]:
    with transaction(broker.engine) as db:
        return list(db.exec(select(SsfStream).where(SsfStream.receiver == receiver)
                            .order_by(col(SsfStream.created_at))).all())


def update(broker: Broker, receiver: str, stream_id: str, change: StreamUpdate) -> SsfStream:
    with transaction(broker.engine) as db:
        row = _get(db, receiver, stream_id, lock=True)
        if change.events_requested is not None:
            row.events_requested = list(dict.fromkeys(change.events_requested))
            row.events_delivered = delivered(change.events_requested)
        if change.description is not None:
            row.description = change.description
        if change.endpoint_url is not None:
            if row.delivery_method != PUSH:
                raise InvalidRequest("a poll stream's endpoint is the broker's", code="invalid-delivery")
            row.endpoint_url = change.endpoint_url
        if change.authorization_header is not None:
            if row.delivery_method != PUSH:
                raise InvalidRequest("a poll stream has no authorization header", code="invalid-delivery")
            row.authorization_header = broker.sealer.seal(change.authorization_header, row.id)
        row.updated_at = utcnow()
        db.add(row)
        _audit(db, receiver, "updated", row, authorization_changed=change.authorization_header is not None)
        return row


def remove(broker: Broker, receiver: str, stream_id: str) -> None:
    with transaction(broker.engine) as db:
        row = _get(db, receiver, stream_id, lock=True)
        db.exec(delete(SsfSubject).where(col(SsfSubject.stream_id) == row.id))
        db.exec(delete(SsfEvent).where(col(SsfEvent.stream_id) == row.id))
        # Its pushes not yet sent go too: nobody is listening for them any more.
        db.exec(delete(OutboxMessage).where(col(OutboxMessage.kind) == KIND, col(OutboxMessage.receiver) == row.id,
                                            col(OutboxMessage.status) == "pending"))
        _audit(db, receiver, "deleted", row)
        db.delete(row)


def set_status(broker: Broker, receiver: str, stream_id: str, status: str, reason: str | None) -> SsfStream:
    with transaction(broker.engine) as db:
        row = _get(db, receiver, stream_id, lock=True)
        was = row.status
        row.status, row.status_reason, row.updated_at = status, reason, utcnow()
        db.add(row)
        if was != "enabled" and status == "enabled" and row.delivery_method == PUSH:
            _release_held(db, row)
        if status == "disabled":  # SSF: a disabled stream's events are not kept
            db.exec(delete(SsfEvent).where(col(SsfEvent.stream_id) == row.id))
        if was != status:
            _audit(db, receiver, "status", row, previous=was, reason=reason)
        return row


def _release_held(db: Session, stream: SsfStream) -> None:
    held = db.exec(select(SsfEvent).where(SsfEvent.stream_id == stream.id).order_by(col(SsfEvent.created_at))).all()
    now = utcnow()
    for event in held:
        _push_row(db, stream, event.body, now)
        db.delete(event)


def add_subject(broker: Broker, receiver: str, stream_id: str, subject: dict[str, Any]) -> None:
    key = subject_key(subject)
    with transaction(broker.engine) as db:
        row = _get(db, receiver, stream_id, lock=True)
        exists = db.exec(select(SsfSubject).where(SsfSubject.stream_id == row.id, SsfSubject.subject_key == key)).first()
        if exists is None:
            db.add(SsfSubject(stream_id=row.id, subject_key=key, added_at=utcnow()))


def remove_subject(broker: Broker, receiver: str, stream_id: str, subject: dict[str, Any]) -> None:
    key = subject_key(subject)
    with transaction(broker.engine) as db:
        row = _get(db, receiver, stream_id, lock=True)
        found = db.exec(select(SsfSubject).where(SsfSubject.stream_id == row.id, SsfSubject.subject_key == key)).first()
        if found is None:
            raise NotFound("the stream has no such subject", code="subject-not-found")
        db.delete(found)


def verify(broker: Broker, receiver: str, stream_id: str, state: str | None) -> None:
    """SSF 1.0 section 8.1.4: a verification event, to this stream only, whatever it requested."""
    now = utcnow()
    with transaction(broker.engine) as db:
        row = _get(db, receiver, stream_id, lock=True)
        if row.status == "disabled":
            raise Conflict("the stream is disabled", code="stream-disabled")
        if row.verified_at is not None:
            wait = MIN_VERIFICATION_INTERVAL - (now - row.verified_at).total_seconds()
            if wait > 0:
                raise RateLimited(f"at most one verification request per {MIN_VERIFICATION_INTERVAL} s",
                                  retry_after=max(1, math.ceil(wait)), scope="ssf-verification")
        row.verified_at = now
        db.add(row)
        event: dict[str, Any] = {"state": state} if state is not None else {}
        _deliver_to(db, broker, row, VERIFICATION, event, {"format": "opaque", "id": row.id}, None, now)


def _claims(broker: Broker, stream: SsfStream, uri: str, event: dict[str, Any], subject: dict[str, Any],
            txn: str | None, now: datetime) -> dict[str, Any]:
    claims: dict[str, Any] = {"iss": broker.settings.issuer, "iat": int(now.timestamp()), "jti": secrets.token_hex(16),
                              "aud": stream.audience, "sub_id": subject, "events": {uri: event}}
    if txn is not None:
        claims["txn"] = txn
    return claims


def _deliver_to(db: Session, broker: Broker, stream: SsfStream, uri: str, event: dict[str, Any],
                subject: dict[str, Any], txn: str | None, now: datetime) -> None:
    claims = _claims(broker, stream, uri, event, subject, txn, now)
    body = json.dumps(claims, sort_keys=True, separators=(",", ":"))
    if stream.delivery_method == PUSH and stream.status == "enabled":
        _push_row(db, stream, body, now)
        return
    queued = db.exec(select(func.count()).select_from(SsfEvent).where(SsfEvent.stream_id == stream.id)).one()
    if queued >= broker.settings.ssf_max_queued_events_per_stream:
        return  # the receiver stopped polling: its oldest events stay, newer ones are dropped (metric below)
    db.add(SsfEvent(jti=claims["jti"], stream_id=stream.id, body=body, created_at=now))


def _push_row(db: Session, stream: SsfStream, body: str, now: datetime) -> None:
    event_uri = next(iter(json.loads(body)["events"]))
    outbox.add(db, kind=KIND, event_id=json.loads(body)["jti"], type_=event_uri.rsplit("/", 1)[-1],
               url=stream.endpoint_url or "", body=body, receiver=stream.id, now=now)


_STREAMS = "broker.ssf.live_streams"


def _live_streams(db: Session) -> list[SsfStream]:
    """The enabled and paused streams, read once per transaction: a sweeper pass revokes a batch of
    leases in one, and each revocation fans out (a stream created meanwhile hears from the next).
    Without autoflush: reading streams is no reason to send each revoked lease's UPDATE on its own."""
    streams: list[SsfStream] | None = db.info.get(_STREAMS)
    if streams is None:
        with db.no_autoflush:
            streams = list(db.exec(select(SsfStream).where(col(SsfStream.status).in_(("enabled", "paused")))).all())
        db.info[_STREAMS] = streams
    return streams


def fan_out(db: Session, broker: Broker, uri: str, event: dict[str, Any], subject: dict[str, Any], txn: str,
            now: datetime) -> int:
    """In the caller's transaction: one SET for each stream that wants this event about this subject."""
    wanted = [s for s in _live_streams(db) if uri in s.events_delivered]
    if not wanted:
        return 0
    keys = _simple_subjects(subject)
    with_subjects: dict[str, set[str]] = {}
    with db.no_autoflush:  # the caller's pending writes are not what this reads
        rows = db.exec(select(SsfSubject).where(col(SsfSubject.stream_id).in_([s.id for s in wanted]))).all()
    for row in rows:
        with_subjects.setdefault(row.stream_id, set()).add(row.subject_key)
    sent = 0
    for stream in wanted:
        added = with_subjects.get(stream.id)
        if added is not None and not added & keys:
            continue  # the receiver narrowed its stream to other subjects
        _deliver_to(db, broker, stream, uri, event, subject, txn, now)
        sent += 1
    return sent


def sign(broker: Broker, body: str) -> str:
    return broker.keyring.sign(json.loads(body), typ="secevent+jwt")


def deliver(broker: Broker, message: OutboxMessage, client: httpx.Client) -> outbox.Attempt:
    """One RFC 8935 push to the stream's endpoint as it is now."""
    with transaction(broker.engine) as db:
        stream = db.get(SsfStream, message.receiver or "")
    if stream is None or stream.status == "disabled" or stream.delivery_method != PUSH or not stream.endpoint_url:
        return outbox.Attempt("the stream was deleted, disabled or is no longer push", permanent=True)
    if stream.status == "paused":
        return outbox.Attempt("the stream is paused")
    headers = {"Content-Type": MEDIA_TYPE, "Accept": "application/json"}
    if stream.authorization_header:
        headers["Authorization"] = broker.sealer.unseal(stream.authorization_header, stream.id)
    try:
        response = client.post(stream.endpoint_url, content=sign(broker, message.body).encode(), headers=headers)
    except httpx.HTTPError as exc:
        return outbox.Attempt(exc.__class__.__name__)
    if 200 <= response.status_code < 300:
        return outbox.DELIVERED
    if response.status_code == 400:
        return outbox.Attempt("HTTP 400 from the receiver (RFC 8935: not sent again)", permanent=True)
    return outbox.Attempt(f"HTTP {response.status_code}")


@dataclass(frozen=True)
class PollAnswer:
    sets: dict[str, str]
    more_available: bool


def poll(broker: Broker, receiver: str, stream_id: str, *, max_events: int, ack: list[str],
         set_errs: dict[str, Any]) -> PollAnswer:
    """RFC 8936: drop what the receiver acknowledged (or reported an error for), hand out the
    oldest waiting SETs (each signed now), say whether more wait."""
    with transaction(broker.engine) as db:
        row = _get(db, receiver, stream_id)
        if row.delivery_method != POLL:
            raise InvalidRequest("this stream is delivered by push", code="invalid-delivery")
        for jti, error in set_errs.items():  # RFC 8936 2.4.3: the receiver could not take these; not resent
            log.warning("SSF receiver %s reported SET %s of stream %s as %s", receiver, jti, row.id,
                        error.get("err"))
        done = list(dict.fromkeys([*ack, *set_errs]))
        if done:
            db.exec(delete(SsfEvent).where(col(SsfEvent.stream_id) == row.id,
                                           col(SsfEvent.jti).in_(done)))
        if row.status != "enabled" or max_events == 0:
            return PollAnswer({}, False)
        waiting = db.exec(select(SsfEvent).where(SsfEvent.stream_id == row.id)
                          .order_by(col(SsfEvent.created_at), col(SsfEvent.jti)).limit(max_events + 1)).all()
    handed = waiting[:max_events]
    return PollAnswer({e.jti: sign(broker, e.body) for e in handed}, len(waiting) > max_events)


def waiting_count(broker: Broker, stream_id: str) -> int:
    with transaction(broker.engine) as db:
        return int(db.exec(select(func.count()).select_from(SsfEvent).where(SsfEvent.stream_id == stream_id)).one())
