"""Waiting out an outage: the CLI and the helpers retry a 503 (and a broker not answering at all)
with backoff, honouring Retry-After, for at most BROKER_RETRY_SECONDS, saying on stderr what they
wait for.

A 503 from the broker means nothing was carried out (docs/outages.md): sending the same request
again, with the same Idempotency-Key where it has one, cannot do it twice. A refused connection
means the request was never sent. The person's CLI does not wait on a refused connection (a wrong BROKER_URL is likelier than a
restart; it says so at once); the helpers, which run unattended inside an agent, do. A request
that was sent and then lost its answer (a read error or
timeout) is not retried here: only an Idempotency-Key makes that safe, and the caller decides.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import httpx

RETRY_ENV = "BROKER_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 30.0  # a PostgreSQL restart or failover, an OpenBao unseal: seconds, not minutes
FIRST_DELAY = 0.5
MAX_DELAY = 8.0

# What each outage code is waiting for, in a person's words.
WAITING_FOR = {
    "database-unavailable": "the broker's database",
    "provider-unavailable": "a backend the broker mints from",
    "identity-provider-unavailable": "the identity provider",
}


def retry_seconds() -> float:
    """BROKER_RETRY_SECONDS: how long to keep retrying in all (0: never retry). Unreadable: the default."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_RETRY_SECONDS
    return max(0.0, min(value, 3600.0)) if value == value else DEFAULT_RETRY_SECONDS  # NaN: the default


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (the delta form, which the broker sends); None when absent or unreadable."""
    raw = response.headers.get("Retry-After", "").strip()
    if not (raw.isascii() and raw.isdigit()):
        return None
    return min(float(raw), MAX_DELAY * 4)


def _waiting_for(response: httpx.Response) -> str:
    try:
        err = response.json().get("error", {})
        code, message = str(err.get("code") or ""), str(err.get("message") or "")
    except (ValueError, AttributeError):
        code, message = "", ""
    what = WAITING_FOR.get(code, "the broker")
    # The broker's message is already fit for a log; it is printed escaped, one line, bounded.
    said = message.encode("unicode_escape").decode("ascii")[:200]
    return f"{what} ({code or f'HTTP {response.status_code}'}{': ' + said if said else ''})"


def send(attempt: Callable[[], httpx.Response], *, base_url: str, say: Callable[[str], None],
         refused: bool = True, budget: float | None = None, sleep: Callable[[float], None] = time.sleep,
         clock: Callable[[], float] = time.monotonic) -> httpx.Response:
    """`attempt()` until it answers something other than 503 or the budget is spent; the last
    answer is returned (a 503 too, for the caller to report). With `refused`, a connection the
    broker refuses (a restart, a rolling deploy) is retried alike, and raised once the budget is spent."""
    budget = retry_seconds() if budget is None else budget
    deadline = clock() + budget
    delay = FIRST_DELAY
    while True:
        try:
            response = attempt()
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if not refused:
                raise
            wait, reason = delay, f"the broker at {base_url} ({type(exc).__name__})"
            failure: Exception | None = exc
        else:
            if response.status_code != 503:
                return response
            wait, reason, failure = max(delay, retry_after(response) or 0.0), _waiting_for(response), None
        left = deadline - clock()
        if left <= 0:
            if failure is not None:
                raise failure
            return response
        wait = min(wait, left)
        say(f"waiting for {reason}; retrying in {wait:.1f}s (gives up in {left:.0f}s, {RETRY_ENV})")
        sleep(wait)
        delay = min(delay * 2, MAX_DELAY)
