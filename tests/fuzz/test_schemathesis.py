"""Schemathesis against the app's own `openapi.yaml`: every operation, as every kind of caller.

The broker runs in process (ASGI) on a real, migrated SQLite database with the test policy.
Each operation is called anonymously and with a valid credential of each kind: an agent's
session token, an orchestrator API key, the admin token, a local human token and an SSF
receiver's token. Every response must be declared (status, content type, body schema, headers)
and none may be a 5xx. The number of examples is bounded so the whole run stays within about
two minutes on CI's two cores.

PostgreSQL-only failure modes (NUL bytes) are covered by tests/integration/test_input_bounds.py
on both databases.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from broker.app import create_app
from broker.identity.callers import Caller
from broker.sessions import service as sessions
from broker.sessions.service import SessionAsk
from tests.support.brokers import BrokerSecrets, build_broker

ROOT = Path(__file__).parents[2]
# Per operation, phase and caller kind. Both can be changed to explore locally, e.g.
# BROKER_FUZZ_SEED=1 BROKER_FUZZ_EXAMPLES=100 pytest tests/fuzz
MAX_EXAMPLES = int(os.environ.get("BROKER_FUZZ_EXAMPLES", "8"))
SEED = int(os.environ.get("BROKER_FUZZ_SEED", "20261122"))  # fixed: CI runs are reproducible

CONFIG = SchemathesisConfig.from_dict({
    "seed": SEED,
    "generation": {"max-examples": MAX_EXAMPLES},
    # negative testing included: malformed input must be a 4xx, never a 5xx or an undeclared status
    "phases": {"stateful": {"enabled": False}},
    # Input the schema allows may still break a domain rule the schema cannot state (the resource
    # grammar, NUL, lone surrogates, "session_id or human+agent+scope"): that is a 400 with a code.
    # 422 stays out: it would mean the document is looser than the models behind it.
    "checks": {
        "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "404", "409", "429"]},
        # a body past its size limit is refused as 413 before it is parsed
        "negative_data_rejection": {"expected-statuses": ["400", "401", "403", "404", "405", "406", "409", "413", "415",
                                                          "422", "428", "429"]},
    },
})


class _App:
    """The ASGI app schemathesis calls; the module fixture plugs the real broker in."""

    target: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert self.target is not None, "the `served` fixture builds the broker first"
        await self.target(scope, receive, send)


APP = _App()
schema = schemathesis.openapi.from_path(ROOT / "openapi.yaml", config=CONFIG)
schema.app = APP  # before parametrize: its operations keep the app they were built with

CALLERS = ("anonymous", "agent", "orchestrator", "admin", "human", "receiver")


class Served:
    def __init__(self, directory: Path) -> None:
        self.secrets = BrokerSecrets()
        receiver_token = "ssf-" + secrets.token_urlsafe(24)  # an SSF receiver (BROKER_SSF_RECEIVER_TOKENS)
        self.broker = build_broker(directory, f"sqlite:///{directory}/broker.db", self.secrets,
                                   ssf_receiver_tokens=f"fuzz={hashlib.sha256(receiver_token.encode()).hexdigest()}")
        self.app = create_app(broker=self.broker, background=False)
        APP.target = self.app
        self.headers: dict[str, dict[str, str]] = {
            "anonymous": {},
            "orchestrator": {"Authorization": f"Bearer {self.secrets.orchestrator_key}"},
            "admin": {"Authorization": f"Bearer {self.secrets.admin_token}"},
            "human": {"Authorization": f"Bearer {self.secrets.human_tokens['alice@example.com']}"},  # local human token
            "receiver": {"Authorization": f"Bearer {receiver_token}"},
        }
        # The orchestrator's step, through the service the route calls, without an HTTP client.
        _, token = sessions.create(self.broker, Caller(kind="orchestrator", name="orch"), SessionAsk(
            human="alice@example.com", agent="claude-code", task_id="fuzz", ttl_seconds=86400,
            scope=[{"resource": "jwt://**", "access": ["*"]}]))
        self.headers["agent"] = {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with tempfile.TemporaryDirectory(prefix="jitb-fuzz-") as directory:
        server = Served(Path(directory))
        yield server
        server.broker.engine.dispose()


@pytest.fixture(params=CALLERS)
def caller(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@schema.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_every_operation_answers_as_declared(case: Any, served: Served, caller: str) -> None:
    case.call_and_validate(headers=served.headers[caller])
