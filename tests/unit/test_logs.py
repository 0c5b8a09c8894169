"""broker/logs.py: the two formats, the request id on every line, uvicorn's lines routed through."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from broker.logs import REQUEST_ID, configure_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    """Put back what configure_logging changes: the root's handlers and level, and uvicorn's loggers."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    uvicorn = {name: (list(lg.handlers), lg.level, lg.propagate)
               for name in ("uvicorn", "uvicorn.error", "uvicorn.access") for lg in [logging.getLogger(name)]}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, (saved, lvl, propagate) in uvicorn.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = saved
        lg.setLevel(lvl)
        lg.propagate = propagate


class _ThisThread(logging.Filter):
    """Only this test's own lines: servers that earlier tests left running in this process (the
    session's GitHub stand-in, a LiveServer still shutting down) log through the same root handler."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.thread


def test_json_lines_carry_the_request_id_and_extras(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out, extra_filters=[_ThisThread()])
    token = REQUEST_ID.set("req_abc")
    try:
        logging.getLogger("broker.test").info("minted %s", "cap_1", extra={"provider": "native"})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("broker.test").exception("failed")
    finally:
        REQUEST_ID.reset(token)
    logging.getLogger("uvicorn.error").info("outside a request")
    logging.getLogger("broker.test").debug("below the level")
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "minted cap_1" and first["request_id"] == "req_abc" and first["provider"] == "native"
    assert first["level"] == "info" and first["logger"] == "broker.test" and first["time"].endswith("+00:00")
    assert second["request_id"] == "req_abc" and "RuntimeError: boom" in second["exception"]
    assert third["logger"] == "uvicorn.error" and third["request_id"] is None


def test_text_is_the_readable_default(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging("warning", stream=out, extra_filters=[_ThisThread()])
    token = REQUEST_ID.set("req_x")
    logging.getLogger("broker.test").warning("careful")
    REQUEST_ID.reset(token)
    logging.getLogger("broker.test").warning("no request")
    first, second = out.getvalue().splitlines()
    assert first.endswith("WARNING broker.test [req_x]: careful")
    assert second.endswith("WARNING broker.test [-]: no request")


def test_configuring_twice_keeps_one_handler_and_refuses_unknown_formats(restore_root: None) -> None:
    configure_logging("info", "json", stream=io.StringIO())
    configure_logging("info", "text", stream=io.StringIO())
    assert len(logging.getLogger().handlers) == 1
    with pytest.raises(ValueError, match="text or json"):
        configure_logging("info", "xml")


def test_secrets_are_redacted_in_message_and_fields(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out, extra_filters=[_ThisThread()])
    vault_token = "hvs." + "A1b2C3d4E5f6G7h8I9j0K1l2"
    github_token = "ghs_" + "x" * 36
    logging.getLogger("broker.test").info("minted %s", vault_token, extra={"detail": f"token {github_token}"})
    logging.getLogger("botocore.parsers").debug("Response body: SecretAccessKey=abc")  # wire logger: dropped
    (line,) = out.getvalue().splitlines()
    assert vault_token not in line and github_token not in line
    record = json.loads(line)
    assert "[redacted]" in record["message"] and "[redacted]" in record["detail"]
    assert not any(key.startswith("_") for key in record)
