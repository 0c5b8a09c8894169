"""The shapes of the broker's own ids: a prefix and 128 random bits in hex.

An id that does not have its shape names nothing: lookups answer not-found without asking
the database, and filters refuse it as bad input. Either way no odd byte reaches a query.
"""

from __future__ import annotations

import re

SESSION_ID_PATTERN = r"^ses_[0-9a-f]{32}$"
CAPABILITY_ID_PATTERN = r"^cap_[0-9a-f]{32}$"
APPROVAL_ID_PATTERN = r"^apr_[0-9a-f]{32}$"

_SESSION = re.compile(SESSION_ID_PATTERN.replace("$", r"\Z"))
_CAPABILITY = re.compile(CAPABILITY_ID_PATTERN.replace("$", r"\Z"))


def is_session_id(value: str) -> bool:
    return _SESSION.match(value) is not None


def is_capability_id(value: str) -> bool:
    return _CAPABILITY.match(value) is not None
