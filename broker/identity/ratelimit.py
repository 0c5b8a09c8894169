"""Rate limits on agents: token buckets per session and per agent name, set in the policy.

Buckets live in this process (per replica). Under N replicas behind a balancer an agent may get
up to N times the configured rate; the README says so. The choice: a limit is a brake on a
runaway loop, not an accounting boundary (budgets in the database are), and a shared store
would put a network round trip and a new point of failure in front of every request.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from prometheus_client import Counter

from broker.errors import BrokerError
from broker.metrics import REGISTRY
from broker.policy.models import RateLimit, RateLimits

RATE_LIMITED = Counter("broker_rate_limited_total", "Requests refused by a rate limit", ["scope"], registry=REGISTRY)
MAX_BUCKETS = 100_000  # least recently used buckets beyond this are forgotten (they were full anyway, mostly)


class RateLimited(BrokerError):
    status = 429
    code = "rate-limited"

    def __init__(self, message: str, *, retry_after: int, scope: str) -> None:
        super().__init__(message, retry_after_seconds=retry_after, scope=scope)
        self.headers = {"Retry-After": str(retry_after)}


class _Bucket:
    __slots__ = ("limit", "stamp", "tokens")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit, self.tokens, self.stamp = limit, float(limit.requests), now

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one will be there."""
        rate = self.limit.requests / self.limit.per_seconds
        self.tokens = min(float(self.limit.requests), self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / rate


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()

    def _take(self, key: tuple[str, str], limit: RateLimit, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None or bucket.limit != limit:  # new, or the policy changed its limit
            bucket = self._buckets[key] = _Bucket(limit, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return bucket.take(now)

    def check(self, limits: RateLimits | None, *, session_id: str, agent: str) -> None:
        """Take one token from each bucket that applies; raise RateLimited when one is empty.

        The session's bucket is checked first and a refusal there takes nothing from the agent's,
        so one runaway session does not drain its agent's siblings any further."""
        if limits is None:
            return
        now = self._clock()
        with self._lock:
            for scope, key, limit in (("session", session_id, limits.per_session), ("agent", agent, limits.per_agent)):
                if limit is None:
                    continue
                wait = self._take((scope, key), limit, now)
                if wait > 0:
                    RATE_LIMITED.labels(scope).inc()
                    raise RateLimited(
                        f"too many requests for this {scope}: {limit.requests} per {limit.per_seconds:g}s",
                        retry_after=max(1, math.ceil(wait)), scope=scope,
                    )
