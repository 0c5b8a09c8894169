"""The agent side of the REST API, for the helpers an agent's tools call (git, AWS SDKs, exec, hooks).

They authenticate with the session token the orchestrator handed the agent
(`BROKER_SESSION_TOKEN`), never with an admin token, and they raise `HelperError` with a
message fit for stderr: the broker's code and message, never a credential.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

from broker.cli import retry
from broker.cli.target import broker_url

SESSION_TOKEN_ENV = "BROKER_SESSION_TOKEN"  # noqa: S105  # an environment variable's name, not a secret
# The agent runtime's own workload token, for sessions bound to it (docs/workload-identity.md):
# a file (re-read on every call, since the platform rotates it: a projected service-account
# token, a JWT-SVID written by a SPIFFE helper) or the token itself.
WORKLOAD_TOKEN_FILE_ENV = "BROKER_WORKLOAD_TOKEN_FILE"  # noqa: S105  # an environment variable's name, not a secret
WORKLOAD_TOKEN_ENV = "BROKER_WORKLOAD_TOKEN"  # noqa: S105  # an environment variable's name, not a secret
WORKLOAD_HEADER = "X-Workload-Token"
# How long a helper waits for a human to decide an approval before giving up (0: do not wait).
APPROVAL_WAIT_ENV = "BROKER_APPROVAL_WAIT"


class HelperError(Exception):
    """A refusal or failure, told without secrets. `code` is the broker's kebab-case code."""

    def __init__(self, message: str, code: str = "helper-error") -> None:
        super().__init__(message)
        self.message, self.code = message, code


def session_token() -> str:
    token = os.environ.get(SESSION_TOKEN_ENV, "").strip()
    if not token:
        raise HelperError(f"{SESSION_TOKEN_ENV} is not set: the orchestrator gives the agent its session token",
                          "no-session-token")
    return token


def workload_token() -> str | None:
    path = os.environ.get(WORKLOAD_TOKEN_FILE_ENV, "").strip()
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read().strip() or None
        except OSError as exc:
            raise HelperError(f"{WORKLOAD_TOKEN_FILE_ENV}: cannot read the workload token file "
                              f"({exc.__class__.__name__})", "no-workload-token") from None
    return os.environ.get(WORKLOAD_TOKEN_ENV, "").strip() or None


def fingerprint(secret: str) -> str:
    """The form in which the broker knows a credential (`credential_fingerprint`)."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class AgentClient:
    """One session's view of the broker."""

    token: str
    base_url: str
    timeout: float = 30.0

    @classmethod
    def from_environment(cls) -> AgentClient:
        return cls(token=session_token(), base_url=broker_url())

    def call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None, timeout: float | None = None) -> httpx.Response:
        """One request, an outage's 503 (or a refused connection) retried with the same headers,
        Idempotency-Key included, for up to BROKER_RETRY_SECONDS (broker/cli/retry.py)."""

        def attempt() -> httpx.Response:
            sent = {"Authorization": f"Bearer {self.token}", **(headers or {})}
            workload = workload_token()  # re-read each time: the platform rotates it
            if workload:
                sent[WORKLOAD_HEADER] = workload
            return httpx.request(method, self.base_url + path, json=json, params=params,
                                 timeout=timeout or self.timeout, headers=sent)

        try:
            return retry.send(attempt, base_url=self.base_url, say=_say)
        except httpx.HTTPError as exc:
            raise HelperError(f"cannot reach the broker at {self.base_url}: {exc.__class__.__name__}",
                              "broker-unreachable") from None

    def request_capability(self, resource: str, access: str, *, purpose: str, tool: str,
                           ttl_seconds: int | None = None, wait_seconds: float | None = None) -> dict[str, Any]:
        """The 201 body of `POST /v1/capabilities`; a pending approval is waited for up to `wait_seconds`."""
        if wait_seconds is None:
            wait_seconds = float(os.environ.get(APPROVAL_WAIT_ENV) or 0)
        body: dict[str, Any] = {"resource": resource, "access": access, "purpose": purpose, "tool": tool}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        # One key per helper invocation: a retried POST replays instead of minting twice.
        key = "helper-" + secrets.token_hex(16)
        response = self.call("POST", "/v1/capabilities", json=body, headers={"Idempotency-Key": key})
        if response.status_code == 202:
            pending = response.json()
            approval_id = pending.get("approval_id")
            if not approval_id or not self._approved(approval_id, wait_seconds):
                raise HelperError(
                    f"{resource} ({access}) needs approval {approval_id} by {', '.join(pending.get('approvers') or [])}"
                    f" ({pending.get('reason')}); run again once it is approved", "approval-required")
            body["approval_id"] = approval_id
            response = self.call("POST", "/v1/capabilities", json=body, headers={"Idempotency-Key": key + "-approved"})
        if response.status_code != 201:
            raise _error(response, f"{resource} ({access})")
        granted: dict[str, Any] = response.json()
        return granted

    def _approved(self, approval_id: str, wait_seconds: float) -> bool:
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            wait = max(1, min(30, int(deadline - time.monotonic())))
            response = self.call("GET", f"/v1/approvals/{approval_id}", params={"wait": wait}, timeout=wait + 15)
            if response.status_code != 200:
                return False
            status = response.json().get("status")
            if status == "approved":
                return True
            if status != "pending":
                return False
        return False

    def revoke(self, capability_id: str) -> dict[str, Any]:
        response = self.call("DELETE", f"/v1/capabilities/{capability_id}")
        if response.status_code != 200:
            raise _error(response, capability_id)
        revoked: dict[str, Any] = response.json()
        return revoked

    def capabilities(self, status: str | None = "active") -> list[dict[str, Any]]:
        response = self.call("GET", "/v1/capabilities", params={"status": status, "limit": 1000} if status else None)
        if response.status_code != 200:
            raise _error(response, "listing capabilities")
        listed: list[dict[str, Any]] = response.json()
        return listed


def _say(line: str) -> None:
    # stderr: git shows it to the person, the AWS SDKs pass it through, exec's child keeps stdout.
    print(f"broker helper: {line}", file=sys.stderr, flush=True)


def _error(response: httpx.Response, what: str) -> HelperError:
    try:
        err = response.json().get("error", {})
        code, message = str(err.get("code") or response.status_code), str(err.get("message") or "")
    except (ValueError, AttributeError):
        code, message = f"http-{response.status_code}", response.text[:200]
    return HelperError(f"{what}: {code}: {message}", code)
