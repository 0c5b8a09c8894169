"""The AWS client of the aws provider: STS and IAM with bounded timeouts, who the broker is, the roles it mints for.

botocore's errors are translated here, at the boundary (`translated`): the broker's own error
tree comes out, never a request or a response.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from broker.errors import Forbidden, ProviderMisconfigured, ProviderRejected, ProviderUnavailable
from broker.plugins import PluginHealth
from broker.providers.aws.names import ROLE_CACHE_SECONDS, RoleRef
from broker.providers.aws.settings import AwsSettings

# ClientError codes, sorted by whose fault they are. Anything else the backend refused is
# ProviderRejected; any HTTP 5xx is ProviderUnavailable.
_UNAVAILABLE = frozenset({
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "ServiceUnavailable", "ServiceUnavailableException", "InternalFailure", "InternalError",
    "RequestTimeout", "RequestTimeoutException", "IDPCommunicationError",
})
_MISCONFIGURED = frozenset({
    "InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException",
    "IncompleteSignature", "MissingAuthenticationToken", "InvalidAccessKeyId", "ExpiredToken",
    "ExpiredTokenException", "AuthFailure",
})

# --- errors at the boundary -------------------------------------------------------------------


def client_error(exc: ClientError, action: str) -> Exception:
    error = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    code = str(error.get("Code", "Unknown"))
    # AWS's messages name ARNs and parameters, never the credentials; clamp them anyway.
    message = f"AWS {action} failed: {code}: {str(error.get('Message', ''))[:300]}"
    details = {"aws_error": code, "aws_request_id": meta.get("RequestId", "")}
    if code in _UNAVAILABLE or int(meta.get("HTTPStatusCode") or 0) >= 500:
        return ProviderUnavailable(message, **details)
    if code in _MISCONFIGURED:
        return ProviderMisconfigured(message + " (the broker's own AWS credentials)", **details)
    return ProviderRejected(message, **details)


@contextmanager
def translated(action: str) -> Iterator[None]:
    """botocore's errors in, the broker's out; `from None` so no request or response rides along."""
    try:
        yield
    except ClientError as exc:
        raise client_error(exc, action) from None
    except (NoCredentialsError, PartialCredentialsError):
        raise ProviderMisconfigured(
            f"AWS {action}: the broker has no AWS credentials (set AWS_* env, a profile, or a role)"
        ) from None
    except ParamValidationError as exc:
        raise ProviderMisconfigured(f"AWS {action}: invalid request: {str(exc)[:300]}") from None
    except BotoCoreError as exc:  # connection refused, timeouts, closed connections, DNS
        raise ProviderUnavailable(f"AWS {action}: {type(exc).__name__}: {str(exc)[:300]}") from None


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class PolicyTooLarge(Exception):
    """IAM's LimitExceeded on PutRolePolicy, kept apart so revoke can fall back."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


# --- who the broker is, and the roles it mints for --------------------------------------------


@dataclass(frozen=True)
class Role:
    role_id: str
    max_session_seconds: int
    fetched: float


@dataclass(frozen=True)
class Caller:
    account: str
    arn: str


def is_role_session(arn: str) -> bool:
    return ":assumed-role/" in arn


class AwsClient:
    """STS and IAM for the broker's own AWS identity, with what it learnt about itself and its roles."""

    def __init__(self, settings: AwsSettings, *, timeout_seconds: float = 10.0,
                 session: boto3.session.Session | None = None) -> None:
        session = session or boto3.session.Session(region_name=settings.aws_region)
        config = Config(
            region_name=settings.aws_region,
            connect_timeout=timeout_seconds,
            read_timeout=timeout_seconds,
            # One retry: bounded at twice the timeout. A retried AssumeRole may mint a second
            # session under the same name; the per-name deny covers both.
            retries={"mode": "standard", "total_max_attempts": 2},
        )
        self.sts: Any = session.client("sts", endpoint_url=settings.aws_endpoint_url, config=config)
        self.iam: Any = session.client("iam", endpoint_url=settings.aws_endpoint_url, config=config)
        self._roles: dict[str, Role] = {}
        self._caller: Caller | None = None

    def health(self) -> PluginHealth:
        try:
            with translated("sts:GetCallerIdentity"):
                out = self.sts.get_caller_identity()
        except Exception as exc:  # noqa: BLE001  # health never raises
            return PluginHealth(ok=False, detail=getattr(exc, "message", type(exc).__name__))
        self._caller = Caller(account=out["Account"], arn=out["Arn"])
        return PluginHealth(ok=True, detail=f"sts reachable as {out['Arn']}")

    def account_id(self) -> str:
        """The account of the broker's own AWS identity (STS GetCallerIdentity, asked once)."""
        return self.whoami().account

    def whoami(self) -> Caller:
        if self._caller is None:
            with translated("sts:GetCallerIdentity"):
                out = self.sts.get_caller_identity()
            self._caller = Caller(account=out["Account"], arn=out["Arn"])
        return self._caller

    def role(self, ref: RoleRef) -> Role:
        cached = self._roles.get(ref.arn)
        if cached and time.monotonic() - cached.fetched < ROLE_CACHE_SECONDS:
            return cached
        caller = self.whoami()
        if caller.account != ref.account:
            # Policies with such rules are refused at load; this is the second lock. A 4xx, and the
            # broker's own account is not named to the caller.
            raise Forbidden(
                f"{ref.arn} is in account {ref.account}, not the account this broker serves: it can only revoke "
                "(PutRolePolicy) on roles of its own account, so it does not mint there",
                code="cross-account-role",
            )
        with translated(f"iam:GetRole on {ref.arn}"):
            role = self.iam.get_role(RoleName=ref.name)["Role"]
        if role["Arn"] != ref.arn:  # same name, other path: not the role the policy names
            raise ProviderMisconfigured(f"role {ref.name!r} is {role['Arn']}, not {ref.arn}")
        found = Role(
            role_id=role["RoleId"],
            max_session_seconds=int(role.get("MaxSessionDuration", 3600)),
            fetched=time.monotonic(),
        )
        self._roles[ref.arn] = found
        return found
