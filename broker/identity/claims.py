"""The shape of a JWT's time claims (`exp`, `nbf`, `iat`), checked before any of them is used.

RFC 7519 section 2 makes them NumericDates: a JSON number of seconds since the epoch. JSON
lets a token carry anything in their place (a string, `true`, a list, `1e400`, which Python
reads as infinity, or `NaN` from a lax encoder), and a number far outside any date makes
`datetime` overflow. Every token path (OIDC logins and client credentials, session and
capability tokens, DPoP proofs) calls `time_claim_problem` on what it decoded, and around
PyJWT's own checks catches the Python errors such values raise inside them, so a malformed
claim is a 400/401 with a code, never a 500.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

TIME_CLAIMS = ("exp", "nbf", "iat")
# 9999-12-31T23:59:59Z: the last second a `datetime` can hold, so every accepted value converts.
MAX_NUMERIC_DATE = 253_402_300_799
# What PyJWT (and `datetime`) raise for values of the wrong type or size inside their checks.
MALFORMED_VALUE_ERRORS = (TypeError, ValueError, OverflowError)


def time_claim_problem(claims: Mapping[str, Any], names: tuple[str, ...] = TIME_CLAIMS) -> str | None:
    """Why one of `names` present in `claims` is not a usable NumericDate, or None."""
    for name in names:
        if name not in claims:
            continue
        value = claims[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"the {name} claim must be a number of seconds (a NumericDate), not {type(value).__name__}"
        if not math.isfinite(value) or not 0 <= value <= MAX_NUMERIC_DATE:
            return f"the {name} claim is not a date between 1970 and 9999"
    return None
