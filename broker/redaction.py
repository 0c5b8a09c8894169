"""No secret in any log line, at any level: a redacting filter and the SDK wire loggers kept quiet.

Two locks, because either alone can fail:

1. **Wire loggers are silenced.** botocore's parsers log whole response bodies at DEBUG (an
   AssumeRole answer carries the secret key and session token), urllib3/httpx/httpcore log
   requests, hvac its calls. `silence_wire_loggers()` sets them to WARNING, and the filter drops
   their records below WARNING even when someone later turns every logger to DEBUG.
2. **Known secret shapes are redacted** from every record that is kept, message, arguments,
   exception text and stack alike: Vault tokens (`hvs.`, `s.`, `b.`, `r.`), GitHub tokens
   (`ghs_`, `ghp_`, `gho_`, `ghu_`, `ghr_`, `github_pat_`), AWS secret keys and session tokens
   (by the field that carries them), JWTs, PEM blocks, `password=...`-style pairs,
   `Authorization` values and passwords in URLs.

A secret without a shape (a database password OpenBao generated) is only protected by the
first lock and by never being logged, which `tests/integration/test_secret_canary.py` checks.

API: `RedactingFilter` (a `logging.Filter`), `install(handler_or_logger)` (adds it, and for a
logger also to each of its handlers), `silence_wire_loggers()`, `redact(text)`. Wired by
`broker.logs.configure_logging`, the one place that sets up logging.
"""

from __future__ import annotations

import logging
import re
import traceback

REDACTED = "[redacted]"

# Loggers that log what crosses the wire (bodies, headers, parsed answers): WARNING and up only.
WIRE_LOGGERS = (
    "botocore", "boto3", "s3transfer", "urllib3", "requests", "hvac", "httpx", "httpcore",
)

_SECRET_FIELDS = (
    r"SecretAccessKey|SessionToken|secret_access_key|session_token|aws_secret_access_key|aws_session_token"  # noqa: S105  # the names of secret fields to redact, not a secret
    r"|x-amz-security-token|password|passwd|pwd|secret|secret_id|client_secret|api_key|apikey|private_key"
    r"|access_token|refresh_token|id_token|session_token|token|client_token|webhook_secret"
)

# (pattern, replacement) in order; each replacement keeps the label and drops the value.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # PEM blocks, whole (private keys, and certificates too: not secret, but never worth a log line)
    (re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(?:-----END [A-Z0-9 ]+-----|\Z)", re.DOTALL), REDACTED),
    # XML elements carrying secrets: <SecretAccessKey>...</SecretAccessKey> (STS answers)
    (re.compile(r"(<(SecretAccessKey|SessionToken|Password|ClientSecret)>)[^<]*(</\2>)", re.IGNORECASE),
     r"\1" + REDACTED + r"\3"),
    # key=value, key: value, "key": "value", 'key': 'value' for secret-bearing field names
    (re.compile(rf"""(?i)((?:{_SECRET_FIELDS})["']?\s*(?:=|:)\s*["']?)([^\s"'&,;}}\]<>]+)"""), r"\1" + REDACTED),
    # Authorization headers (Bearer, token, Basic, AWS4 signatures)
    (re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:bearer|token|basic|aws4-hmac-sha256)?\s*)[^\s\"',}]+"),
     r"\1" + REDACTED),
    # passwords in URLs: scheme://user:password@host
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]+:)[^\s@/]+@"), r"\1" + REDACTED + "@"),
    # JWTs (header.payload.signature, the signature may be empty for alg=none)
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
    # GitHub tokens
    (re.compile(r"\b(?:gh[psour]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"), REDACTED),
    # Vault/OpenBao tokens: hvs./hvb./hvr. and the legacy s./b./r. forms
    (re.compile(r"\b(?:hv[sbr]|[sbr])\.[A-Za-z0-9_-]{16,}"), REDACTED),
    # AWS session tokens without their field name (long base64 starting like STS's)
    (re.compile(r"\b(?:FwoGZXIvYXdz|IQoJb3JpZ2lu|FQoGZXIvYXdz|AQoDYXdz)[A-Za-z0-9/+=]{20,}"), REDACTED),
)


def redact(text: str) -> str:
    """`text` with every known secret shape replaced by "[redacted]"."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


def _is_wire(name: str) -> bool:
    return any(name == w or name.startswith(w + ".") for w in WIRE_LOGGERS)


class RedactingFilter(logging.Filter):
    """Drops wire-logger chatter below WARNING and redacts secret shapes from what remains.

    Attach it to handlers (a logger's own filters do not see records its children propagate);
    `install` does that. Idempotent per record, so a record passing two filtered handlers is
    rewritten once.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_wire(record.name) and record.levelno < logging.WARNING:
            return False
        if getattr(record, "_jb_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  # a broken format string: keep what we can, redacted (a filter must not raise)
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record._jb_redacted = True
        return True


_FILTER = RedactingFilter()


def install(target: logging.Handler | logging.Logger | None = None) -> RedactingFilter:
    """Add the redacting filter to a handler, or to a logger and each of its handlers
    (default: the root logger). Safe to call more than once."""
    target = logging.getLogger() if target is None else target
    handlers = [target] if isinstance(target, logging.Handler) else [target, *target.handlers]
    for h in handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(_FILTER)
    return _FILTER


def silence_wire_loggers(level: int = logging.WARNING) -> None:
    """SDK wire loggers to WARNING whatever the broker's own level (the filter enforces it too)."""
    for name in (*WIRE_LOGGERS, "botocore.parsers", "botocore.endpoint", "botocore.hooks", "botocore.auth",
                 "botocore.retryhandler", "urllib3.connectionpool"):
        logging.getLogger(name).setLevel(level)
