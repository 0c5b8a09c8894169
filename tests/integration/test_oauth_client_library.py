"""Acceptance: a standard OAuth client (authlib) exchanges and revokes against a served broker,
with nothing broker-specific but the endpoint it discovers; a resource server checks the
result as any would: signature by the JWKS (PyJWT), liveness by RFC 7662 introspection."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
import requests
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.requests_client import OAuth2Session

from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker, free_port

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[Api]:
    """A broker whose issuer and public URL are the address it is really served at, as in production."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, issuer=url, public_url=url)
    with LiveServer(broker, port=port) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)


class ResourceServer:
    """What payments-api would run: it knows the broker only by its metadata URL."""

    def __init__(self, metadata_url: str, audience: str) -> None:
        self.metadata = requests.get(metadata_url, timeout=10).json()
        self.jwks = jwt.PyJWKClient(self.metadata["jwks_uri"])
        self.audience = audience

    def verify(self, token: str) -> dict:
        key = self.jwks.get_signing_key_from_jwt(token)
        return jwt.decode(token, key.key, algorithms=["EdDSA"], audience=self.audience,
                          issuer=self.metadata["issuer"], options={"require": ["exp", "iat", "jti", "sub"]})

    def introspect(self, token: str) -> dict:
        r = requests.post(self.metadata["introspection_endpoint"], data={"token": token}, timeout=10)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]


def test_authlib_exchanges_and_revokes_and_a_resource_server_verifies(served: Api) -> None:
    api = served
    session = api.new_session()
    metadata_url = f"{api.base_url}/.well-known/oauth-authorization-server"
    metadata = requests.get(metadata_url, timeout=10).json()
    assert GRANT in metadata["grant_types_supported"]

    client = OAuth2Session(client_id="claude-code", token_endpoint_auth_method="none")
    token = client.fetch_token(
        metadata["token_endpoint"], grant_type=GRANT, subject_token=session["session_token"],
        subject_token_type=JWT_TYPE, resource="jwt://payments-api", scope="read",
    )
    assert token["token_type"] == "Bearer" and token["expires_in"] > 0
    assert token["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    capability_id = token["authorization_details"][0]["capability_id"]

    server = ResourceServer(metadata_url, audience="payments-api")
    claims = server.verify(token["access_token"])
    assert claims["jti"] == capability_id and claims["sub"] == "alice@example.com"
    assert claims["scope"] == "ledger:read"
    live = server.introspect(token["access_token"])
    assert live["active"] is True and live["jti"] == capability_id

    # RFC 7009, authenticated as DELETE on the capability is: the agent's own session token.
    revoked = client.revoke_token(metadata["revocation_endpoint"], token["access_token"],
                                  token_type_hint="access_token",
                                  headers={"Authorization": f"Bearer {session['session_token']}"})
    assert revoked.status_code == 200, revoked.text
    assert server.introspect(token["access_token"]) == {"active": False}
    # The signature still verifies offline; only introspection knows it is dead (see docs/oauth.md).
    assert server.verify(token["access_token"])["jti"] == capability_id
    view = api.client.get(f"/v1/capabilities/{capability_id}", headers=api.as_admin()).json()
    assert view["status"] == "revoked"


def test_authlib_surfaces_the_rfc_error_for_a_denied_exchange(served: Api) -> None:
    api = served
    session = api.new_session()
    endpoint = requests.get(f"{api.base_url}/.well-known/oauth-authorization-server", timeout=10).json()[
        "token_endpoint"]
    client = OAuth2Session(client_id="claude-code", token_endpoint_auth_method="none")
    with pytest.raises(OAuthError) as refused:
        client.fetch_token(endpoint, grant_type=GRANT, subject_token=session["session_token"],
                           subject_token_type=JWT_TYPE, resource="jwt://payments-api", scope="drop")
    assert refused.value.error == "access_denied"
    with pytest.raises(OAuthError) as bad:
        client.fetch_token(endpoint, grant_type=GRANT, subject_token="x.y.z", subject_token_type=JWT_TYPE,
                           resource="jwt://payments-api", scope="read")
    assert bad.value.error == "invalid_grant"


def test_a_client_configured_only_from_the_metadata_exchanges_revokes_and_introspects(served: Api) -> None:
    """RFC 8414: every auth method the client uses comes from the metadata (an absent
    revocation member would have meant client_secret_basic); no header is added by hand."""
    api = served
    session = api.new_session()
    metadata = requests.get(f"{api.base_url}/.well-known/oauth-authorization-server", timeout=10).json()
    client = OAuth2Session(
        client_id="claude-code",
        token_endpoint_auth_method=metadata["token_endpoint_auth_methods_supported"][0],
        revocation_endpoint_auth_method=metadata["revocation_endpoint_auth_methods_supported"][0],
    )
    token = client.fetch_token(metadata["token_endpoint"], grant_type=GRANT, subject_token=session["session_token"],
                               subject_token_type=JWT_TYPE, resource="jwt://payments-api", scope="read")
    capability_id = token["authorization_details"][0]["capability_id"]
    assert client.introspect_token(metadata["introspection_endpoint"], token["access_token"]).json()["active"] is True

    revoked = client.revoke_token(metadata["revocation_endpoint"], token["access_token"], token_type_hint="access_token")
    assert revoked.status_code == 200, revoked.text
    assert client.introspect_token(metadata["introspection_endpoint"], token["access_token"]).json() == {"active": False}
    cap = api.client.get(f"/v1/capabilities/{capability_id}", headers=api.as_admin()).json()
    assert cap["status"] == "revoked"
    records = api.client.get("/v1/audit", params={"session_id": session["session_id"]}, headers=api.as_admin()).json()
    revoked_records = [r for r in records["records"] if r["type"] == "capability.revoked"]
    assert len(revoked_records) == 1 and "token-holder" in str(revoked_records[0])
