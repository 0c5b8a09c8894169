"""The redacting log filter: every known secret shape out, wire loggers quiet at any level."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from broker import redaction

# Made-up values in each secret shape, assembled at run time so no tracked file carries a
# string a secret scanner would flag.
SECRETS = {
    "vault service token": "hvs.CAESIJ1rN2x4bGZ4eXpYb2t0eHp4eHp4eHp4eHp4eA",
    "vault legacy token": "s.Qf1s5zigZ4OX6akYjQXJC1jY",
    "github installation token": "ghs" + "_16C7e42F292c6912E7710c838347Ae178B4a",
    "github personal token": "ghp" + "_16C7e42F292c6912E7710c838347Ae178B4a",
    "github fine-grained token": "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
    "jwt": "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz",
    "sts session token": "FwoGZXIvYXdzEBYaDHhBZ2xvYmFsc2Vzc2lvbnRva2VuZXhhbXBsZQ==",
}

CASES = [
    # (text, the secret that must be gone)
    *[(f"minted {value} for alice", value) for value in SECRETS.values()],
    ("<SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY</SecretAccessKey>",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("{'SecretAccessKey': 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY', 'Expiration': 1}",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ('{"secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}', "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("<SessionToken>AQoDYXdzEPT//////////wEXAMPLEtc764</SessionToken>", "AQoDYXdzEPT//////////wEXAMPLEtc764"),
    ("connect password=hunter2-but-longer user=x", "hunter2-but-longer"),
    ("login with {'password': 'Zq8-random-db-pass'}", "Zq8-random-db-pass"),
    ("postgresql://v-ledger:Zq8-random-db-pass@127.0.0.1/db", "Zq8-random-db-pass"),
    ("Authorization: Bearer opaque-token-value-123", "opaque-token-value-123"),
    ("-----BEGIN RSA " + "PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA " + "PRIVATE KEY-----", "MIIEpAIBAAKCAQEA"),
]


@pytest.mark.parametrize(("text", "secret"), CASES)
def test_redact_known_shapes(text: str, secret: str) -> None:
    out = redaction.redact(text)
    assert secret not in out
    assert redaction.REDACTED in out


@pytest.mark.parametrize("text", [
    "capability cap_0123456789abcdef minted for github://acme/widgets",
    "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "vault: could not shorten lease on database/creds/ledger-test to 300s (provider-unavailable)",
])
def test_ordinary_lines_are_left_alone(text: str) -> None:
    assert redaction.redact(text) == text


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    redaction.install(handler)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield root, stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_filter_redacts_message_arguments_and_exceptions(captured: tuple[logging.Logger, io.StringIO]) -> None:
    _, stream = captured
    token = SECRETS["vault service token"]
    log = logging.getLogger("broker.test")
    log.info("token %s issued", token)
    try:
        raise RuntimeError(f"backend said {SECRETS['github installation token']}")
    except RuntimeError:
        log.exception("mint failed with %r", {"password": "Zq8-random-db-pass"})
    out = stream.getvalue()
    assert "token [redacted] issued" in out and "backend said [redacted]" in out
    for secret in (token, SECRETS["github installation token"], "Zq8-random-db-pass"):
        assert secret not in out


def test_wire_loggers_are_dropped_below_warning_even_at_debug(captured: tuple[logging.Logger, io.StringIO]) -> None:
    _, stream = captured
    for name in ("botocore.parsers", "botocore.endpoint", "botocore.hooks", "urllib3.connectionpool", "hvac",
                 "httpx", "httpcore.http11"):
        wire = logging.getLogger(name)
        wire.setLevel(logging.DEBUG)  # someone turned everything up
        wire.debug("Response body: b'<SecretAccessKey>abc</SecretAccessKey>'")
        wire.info("HTTP Request: POST https://sts.amazonaws.com")
    logging.getLogger("botocore.endpoint").warning("retrying after %s", "throttling")
    lines = stream.getvalue().splitlines()
    assert lines == ["WARNING botocore.endpoint: retrying after throttling"]


def test_silence_wire_loggers_sets_warning() -> None:
    redaction.silence_wire_loggers()
    for name in ("botocore", "botocore.parsers", "urllib3", "hvac", "httpx", "httpcore"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING


def test_install_is_idempotent_and_reaches_a_loggers_handlers() -> None:
    logger = logging.getLogger("broker.test.install")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        redaction.install(logger)
        redaction.install(logger)
        assert sum(isinstance(f, redaction.RedactingFilter) for f in handler.filters) == 1
        assert sum(isinstance(f, redaction.RedactingFilter) for f in logger.filters) == 1
    finally:
        logger.removeHandler(handler)
