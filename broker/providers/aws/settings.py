"""The aws provider's settings: BROKER_AWS_* (read by the provider, not by core config)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AwsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="ignore", case_sensitive=False)

    aws_region: str = "us-east-1"
    # The account the broker's AWS identity lives in. Policy rules for roles of any other account
    # are refused when the policy loads (the broker can only revoke on its own account's roles).
    # None: asked of STS (GetCallerIdentity) at start when the policy uses the aws provider.
    aws_account_id: str | None = Field(default=None, pattern=r"^\d{12}$")
    # Set for a local STS/IAM (moto) or a VPC endpoint; None means AWS's public endpoints.
    aws_endpoint_url: str | None = None
