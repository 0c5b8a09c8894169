"""Who the broker sees (`GET /v1/whoami`) and how a person signs in (`GET /v1/login`)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from broker.api.deps import AnyCaller, BrokerDep
from broker.api.schemas.common import error_responses

router = APIRouter(prefix="/v1", tags=["identity"])


class WhoAmI(BaseModel):
    kind: str = Field(description="agent, orchestrator, human or admin")
    name: str = Field(description="the agent's, orchestrator's or human's name (a human's canonical principal, docs/identity.md)")
    groups: list[str] = Field(description="humans: every group policy decisions use (policy membership and IdP groups)")
    idp_groups: list[str] = Field(description="humans: the groups the identity provider's token named")
    session_id: str | None = Field(default=None, description="agents: the session their token belongs to")


class LoginConfig(BaseModel):
    """What `broker-cli login` needs to run the device authorization grant; nothing secret."""

    issuer: str | None = Field(description="the OpenID provider humans sign in with; null when none is configured")
    client_id: str | None = Field(description="the public client registered for the CLI's device flow")
    scope: str
    audience: str | None = Field(description="the one `aud` the broker accepts")
    resource: str | None = Field(description="RFC 8707 resource indicator to send, for IdPs that pick the audience by it")


@router.get("/whoami", response_model=WhoAmI, responses=error_responses(401, 503))
def whoami(caller: AnyCaller, broker: BrokerDep) -> WhoAmI:
    groups: list[str] = []
    if caller.kind == "human":
        groups = list(broker.policies.current.groups_of(caller.name, caller.groups))
    return WhoAmI(kind=caller.kind, name=caller.name, groups=groups, idp_groups=sorted(caller.groups),
                  session_id=caller.session_id)


@router.get("/login", response_model=LoginConfig)
def login_config(broker: BrokerDep) -> LoginConfig:
    s = broker.settings
    return LoginConfig(issuer=s.oidc_issuer, client_id=s.oidc_cli_client_id, scope=s.oidc_cli_scope,
                       audience=s.oidc_audience, resource=s.oidc_cli_resource)
