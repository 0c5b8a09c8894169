"""OpenID SSF 1.0 transmitter endpoints: the configuration, streams, status, subjects, verification, poll."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from broker.api.deps import BrokerDep
from broker.api.schemas.common import error_responses
from broker.errors import InvalidRequest, Unauthenticated
from broker.identity.callers import bearer
from broker.identity.oidc import is_loopback
from broker.models import SsfStream
from broker.runtime import Broker
from broker.ssf import streams

router = APIRouter(tags=["ssf"])
ERRORS = error_responses(400, 401, 404, 409, 422)
STREAM_ID = r"^ssf_[0-9a-f]{24}$"
_PRINTABLE = r"^[\x20-\x7e]*$"  # a header value: no CR/LF (no header injection), nothing invisible
# Text a person reads: no C0/C1 controls, line or paragraph separators, bidi controls or zero-width characters.
_TEXT = r"^[^\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]*$"
_SUBJECT_FORMATS = {"opaque", "email", "jwt_id", "complex", "iss_sub"}
_SIMPLE_VALUE = re.compile(r"^[\x20-\x7e]{1,320}$")


async def get_receiver(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The SSF receiver a bearer token from BROKER_SSF_RECEIVER_TOKENS names."""
    broker: Broker = request.app.state.broker
    token = bearer(authorization)
    name = broker.settings.ssf_receiver_hashes().get(hashlib.sha256(token.encode()).hexdigest())
    if name is None:
        raise Unauthenticated("not a token of an SSF receiver", code="invalid-token")
    return name


ReceiverCaller = Annotated[str, Depends(get_receiver)]
StreamIdQuery = Annotated[str, Query(pattern=STREAM_ID)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeliveryIn(_Strict):
    method: Literal["urn:ietf:rfc:8935", "urn:ietf:rfc:8936"]
    endpoint_url: str | None = Field(default=None, max_length=2048, pattern=_PRINTABLE)
    authorization_header: str | None = Field(default=None, min_length=1, max_length=4096, pattern=_PRINTABLE)


class DeliveryPatch(_Strict):
    method: Literal["urn:ietf:rfc:8935", "urn:ietf:rfc:8936"] | None = None
    endpoint_url: str | None = Field(default=None, max_length=2048, pattern=_PRINTABLE)
    authorization_header: str | None = Field(default=None, min_length=1, max_length=4096, pattern=_PRINTABLE)


EventList = Annotated[list[Annotated[str, Field(min_length=1, max_length=256, pattern=_PRINTABLE)]],
                      Field(max_length=16)]


class StreamCreate(_Strict):
    delivery: DeliveryIn
    events_requested: EventList = Field(default_factory=list)
    description: str | None = Field(default=None, max_length=255, pattern=_TEXT)


class StreamPatch(_Strict):
    stream_id: str = Field(pattern=STREAM_ID)
    delivery: DeliveryPatch | None = None
    events_requested: EventList | None = None
    description: str | None = Field(default=None, max_length=255, pattern=_TEXT)


class DeliveryOut(BaseModel):
    method: str
    endpoint_url: str | None


class StreamOut(BaseModel):
    stream_id: str
    iss: str
    aud: str
    delivery: DeliveryOut
    events_supported: list[str]
    events_requested: list[str]
    events_delivered: list[str]
    description: str | None = None
    min_verification_interval: int = streams.MIN_VERIFICATION_INTERVAL


class StatusIn(_Strict):
    stream_id: str = Field(pattern=STREAM_ID)
    status: Literal["enabled", "paused", "disabled"]
    reason: str | None = Field(default=None, max_length=256, pattern=_TEXT)


class StatusOut(BaseModel):
    stream_id: str
    status: str
    reason: str | None = None


def _check_subject(value: Any, *, depth: int = 0) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("format"), str) \
            or value["format"] not in _SUBJECT_FORMATS or len(value) > 8:
        raise ValueError(f"a subject is an object with a format ({', '.join(sorted(_SUBJECT_FORMATS))})")
    for k, v in value.items():
        if not isinstance(k, str) or not re.match(r"^[a-z_]{1,32}$", k):
            raise ValueError("a subject's member names are lowercase letters and underscores")
        if k == "format":
            continue
        if value["format"] == "complex" and depth == 0:
            _check_subject(v, depth=1)
        elif not isinstance(v, str) or not _SIMPLE_VALUE.match(v):
            raise ValueError("a subject's values are printable ASCII strings of at most 320 characters")
    if len(streams.subject_key(value)) > 1024:
        raise ValueError("a subject is at most 1024 bytes of JSON")
    return value


class SubjectIn(_Strict):
    stream_id: str = Field(pattern=STREAM_ID)
    subject: dict[str, Any]
    verified: bool | None = None

    def checked_subject(self) -> dict[str, Any]:
        """The subject's shape is a domain rule the schema does not state: a 400 with a code."""
        try:
            return _check_subject(self.subject)
        except ValueError as exc:
            raise InvalidRequest(str(exc), code="invalid-subject") from None


class VerifyIn(_Strict):
    stream_id: str = Field(pattern=STREAM_ID)
    state: str | None = Field(default=None, max_length=256, pattern=_PRINTABLE)


class SetError(_Strict):
    err: str = Field(max_length=64, pattern=r"^[a-z_]{1,64}$")
    description: str | None = Field(default=None, max_length=512)


class PollIn(_Strict):
    """RFC 8936 section 2.4 (its member names are camelCase)."""

    maxEvents: int = Field(default=100, ge=0, le=1000)  # RFC 8936's name
    returnImmediately: bool = True  # RFC 8936's name; the broker never holds a poll open
    ack: list[Annotated[str, Field(max_length=64, pattern=r"^[0-9a-f]{1,64}$")]] = Field(default_factory=list,
                                                                                          max_length=1000)
    setErrs: dict[Annotated[str, Field(max_length=64, pattern=r"^[0-9a-f]{1,64}$")], SetError] = Field(
        default_factory=dict, max_length=1000)


class PollOut(BaseModel):
    sets: dict[str, str]
    moreAvailable: bool  # RFC 8936's name


class SsfConfiguration(BaseModel):
    spec_version: str = "1_0"
    issuer: str
    jwks_uri: str
    delivery_methods_supported: list[str]
    configuration_endpoint: str
    status_endpoint: str
    add_subject_endpoint: str
    remove_subject_endpoint: str
    verification_endpoint: str
    authorization_schemes: list[dict[str, str]]
    default_subjects: str = "ALL"


def _endpoint(url: str | None) -> str:
    if not url or not url.startswith(("https://", "http://")):
        raise InvalidRequest("push delivery needs an http(s) endpoint_url", code="invalid-endpoint")
    if url.startswith("http://") and not is_loopback(url):
        raise InvalidRequest("a push endpoint must be https (plain http only on loopback)", code="invalid-endpoint")
    return url


def _out(broker: Broker, row: SsfStream) -> StreamOut:
    endpoint = row.endpoint_url if row.delivery_method == streams.PUSH else _poll_url(broker, row.id)
    return StreamOut(stream_id=row.id, iss=broker.settings.issuer, aud=row.audience,
                     delivery=DeliveryOut(method=row.delivery_method, endpoint_url=endpoint),
                     events_supported=streams.EVENTS_SUPPORTED, events_requested=row.events_requested,
                     events_delivered=row.events_delivered, description=row.description)


def _poll_url(broker: Broker, stream_id: str) -> str:
    return f"{broker.settings.public_base_url()}/v1/ssf/poll?stream_id={stream_id}"


@router.get("/.well-known/ssf-configuration", response_model=SsfConfiguration)
def ssf_configuration(broker: BrokerDep) -> SsfConfiguration:
    """SSF 1.0 transmitter metadata."""
    base = broker.settings.public_base_url()
    return SsfConfiguration(
        issuer=broker.settings.issuer, jwks_uri=f"{base}/.well-known/jwks.json",
        delivery_methods_supported=[streams.PUSH, streams.POLL],
        configuration_endpoint=f"{base}/v1/ssf/streams", status_endpoint=f"{base}/v1/ssf/status",
        add_subject_endpoint=f"{base}/v1/ssf/subjects:add", remove_subject_endpoint=f"{base}/v1/ssf/subjects:remove",
        verification_endpoint=f"{base}/v1/ssf/verify", authorization_schemes=[{"spec_urn": "urn:ietf:rfc:6750"}])


@router.post("/v1/ssf/streams", response_model=StreamOut, status_code=201, responses=ERRORS)
def create_stream(broker: BrokerDep, receiver: ReceiverCaller, body: StreamCreate) -> StreamOut:
    """Create a stream owned by the calling receiver."""
    endpoint = _endpoint(body.delivery.endpoint_url) if body.delivery.method == streams.PUSH else None
    if body.delivery.method == streams.POLL and (body.delivery.endpoint_url or body.delivery.authorization_header):
        raise InvalidRequest("a poll stream's endpoint is the broker's: give no endpoint_url", code="invalid-delivery")
    row = streams.create(broker, receiver, method=body.delivery.method, endpoint_url=endpoint,
                         authorization_header=body.delivery.authorization_header,
                         events_requested=body.events_requested, description=body.description)
    return _out(broker, row)


@router.get("/v1/ssf/streams", response_model=StreamOut | list[StreamOut], responses=ERRORS)
def read_streams(broker: BrokerDep, receiver: ReceiverCaller,
                 stream_id: Annotated[str | None, Query(pattern=STREAM_ID)] = None) -> StreamOut | list[StreamOut]:
    """One stream of the caller's (`stream_id`), or all of them."""
    if stream_id is None:
        return [_out(broker, r) for r in streams.list_streams(broker, receiver)]
    return _out(broker, streams.read(broker, receiver, stream_id))


@router.patch("/v1/ssf/streams", response_model=StreamOut, responses=ERRORS)
def update_stream(broker: BrokerDep, receiver: ReceiverCaller, body: StreamPatch) -> StreamOut:
    """Change what a stream asks for, its description, or its push endpoint and authorization."""
    current = streams.read(broker, receiver, body.stream_id)
    delivery = body.delivery
    if delivery is not None and delivery.method is not None and delivery.method != current.delivery_method:
        raise InvalidRequest("a stream's delivery method cannot change: create another stream",
                             code="invalid-delivery")
    change = streams.StreamUpdate(
        events_requested=body.events_requested, description=body.description,
        endpoint_url=_endpoint(delivery.endpoint_url) if delivery and delivery.endpoint_url is not None else None,
        authorization_header=delivery.authorization_header if delivery else None)
    return _out(broker, streams.update(broker, receiver, body.stream_id, change))


@router.delete("/v1/ssf/streams", status_code=204, responses=ERRORS)
def delete_stream(broker: BrokerDep, receiver: ReceiverCaller, stream_id: StreamIdQuery) -> Response:
    """Delete a stream: its subjects and waiting events go with it."""
    streams.remove(broker, receiver, stream_id)
    return Response(status_code=204)


@router.get("/v1/ssf/status", response_model=StatusOut, responses=ERRORS)
def read_status(broker: BrokerDep, receiver: ReceiverCaller, stream_id: StreamIdQuery) -> StatusOut:
    row = streams.read(broker, receiver, stream_id)
    return StatusOut(stream_id=row.id, status=row.status, reason=row.status_reason)


@router.post("/v1/ssf/status", response_model=StatusOut, responses=ERRORS)
def update_status(broker: BrokerDep, receiver: ReceiverCaller, body: StatusIn) -> StatusOut:
    """enabled, paused (events wait), disabled (events are dropped)."""
    row = streams.set_status(broker, receiver, body.stream_id, body.status, body.reason)
    return StatusOut(stream_id=row.id, status=row.status, reason=row.status_reason)


@router.post("/v1/ssf/subjects:add", status_code=200, responses=ERRORS)
def add_subject(broker: BrokerDep, receiver: ReceiverCaller, body: SubjectIn) -> Response:
    """Narrow the stream to events about the subjects added (none added: every subject)."""
    streams.add_subject(broker, receiver, body.stream_id, body.checked_subject())
    return Response(status_code=200)


@router.post("/v1/ssf/subjects:remove", status_code=204, responses=ERRORS)
def remove_subject(broker: BrokerDep, receiver: ReceiverCaller, body: SubjectIn) -> Response:
    streams.remove_subject(broker, receiver, body.stream_id, body.checked_subject())
    return Response(status_code=204)


@router.post("/v1/ssf/verify", status_code=204, responses=error_responses(400, 401, 404, 409, 422, 429))
def verify_stream(broker: BrokerDep, receiver: ReceiverCaller, body: VerifyIn) -> Response:
    """Send a verification event (with `state`, if given) down the stream."""
    streams.verify(broker, receiver, body.stream_id, body.state)
    return Response(status_code=204)


@router.post("/v1/ssf/poll", response_model=PollOut, responses=ERRORS)
def poll_stream(broker: BrokerDep, receiver: ReceiverCaller, stream_id: StreamIdQuery, body: PollIn) -> PollOut:
    """RFC 8936: acknowledge what was received, take what waits."""
    answer = streams.poll(broker, receiver, stream_id, max_events=body.maxEvents, ack=body.ack,
                          set_errs={k: v.model_dump() for k, v in body.setErrs.items()})
    return PollOut(sets=answer.sets, moreAvailable=answer.more_available)



