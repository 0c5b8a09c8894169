"""Per-caller budgets for live-permission calls: one caller cannot spend the backend's quota.

A live source costs quota at the backend (a GitHub App has a few thousand API calls an hour for
the whole installation); when it runs out, every live check fails closed for everyone. So each
caller (an agent session on the capability path, a human or admin on `policy explain`) has a
token bucket of backend calls: `live_check_budget` calls, refilled at that many per
`live_check_budget_seconds`. Only calls that would reach the backend are charged: an answer from
the cache, or one shared with another caller's call already in flight, costs nothing, and a
refused caller creates no call for others to wait on. Past the budget the caller gets 429
`live-check-budget-exceeded` with `Retry-After`; no other caller's bucket is touched.

Buckets live in this process, like the agents' rate limits (broker/identity/ratelimit.py): with
N replicas a caller may spend up to N budgets. The cache and the budget together bound one
caller's spend to `live_check_budget` per window per replica however it varies its questions.
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

BUDGET_REFUSED = Counter("broker_live_check_budget_refused_total",
                         "Live-permission calls refused because the caller's budget was spent", registry=REGISTRY)
MAX_CALLERS = 100_000  # least recently used buckets beyond this are forgotten (they were full, mostly)


class LiveCheckBudgetExceeded(BrokerError):
    status = 429
    code = "live-check-budget-exceeded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, retry_after_seconds=retry_after)
        self.headers = {"Retry-After": str(retry_after)}


class LiveCheckBudget:
    """Token buckets of backend calls, one per caller key (`session:<id>`, `human:<email>` ...)."""

    def __init__(self, calls: int, per_seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.calls, self.per_seconds = calls, per_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, stamp)

    @property
    def enabled(self) -> bool:
        return self.calls > 0

    def take(self, caller: str) -> None:
        """Spend one backend call of `caller`'s budget, or raise LiveCheckBudgetExceeded."""
        if not self.enabled:
            return
        rate = self.calls / self.per_seconds
        now = self._clock()
        with self._lock:
            tokens, stamp = self._buckets.pop(caller, (float(self.calls), now))
            tokens = min(float(self.calls), tokens + (now - stamp) * rate)
            if tokens >= 1:
                self._buckets[caller] = (tokens - 1, now)
                refused = False
            else:
                self._buckets[caller] = (tokens, now)
                refused = True
            while len(self._buckets) > MAX_CALLERS:
                self._buckets.popitem(last=False)
        if refused:
            BUDGET_REFUSED.inc()
            wait = max(1, math.ceil((1 - tokens) / rate))
            raise LiveCheckBudgetExceeded(
                f"this caller's live permission checks are spent ({self.calls} per {self.per_seconds:g}s); "
                f"answers already cached still count, new ones wait", retry_after=wait)

    def remaining(self, caller: str) -> float:
        """Tokens left for `caller` now (observability and tests)."""
        now = self._clock()
        with self._lock:
            tokens, stamp = self._buckets.get(caller, (float(self.calls), now))
        return min(float(self.calls), tokens + (now - stamp) * self.calls / self.per_seconds)
