"""A short-lived cache of live answers, single-flight: a burst of requests costs one backend call.

Only definite answers (allow, deny) are kept, for `ttl_seconds`; `unknown` (the backend could
not answer) is never kept, so a source that comes back is asked again at once. Concurrent
misses for one key wait for the first caller's backend call and share its answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from broker.permissions.base import UNKNOWN, SourceAnswer

# A waiter never waits longer than this for another caller's backend call; then it asks itself.
MAX_WAIT_SECONDS = 30.0
MAX_ENTRIES = 50_000  # bounded memory: expired entries go first, then the oldest


@dataclass
class _Flight:
    done: threading.Event = field(default_factory=threading.Event)
    answer: SourceAnswer | None = None
    waiters: int = 0  # callers sharing this call (observability, and what tests wait on)


class AnswerCache:
    def __init__(self, ttl_seconds: float, *, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = MAX_ENTRIES) -> None:
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._max = max_entries
        self._lock = threading.Lock()
        self._entries: dict[Hashable, tuple[float, SourceAnswer]] = {}  # key -> (expires, answer)
        self._flights: dict[Hashable, _Flight] = {}

    def get_or_fetch(self, key: Hashable, fetch: Callable[[], SourceAnswer], *,
                     fresh: bool = False, admit: Callable[[], None] | None = None) -> tuple[SourceAnswer, bool]:
        """(answer, came_from_cache). `fresh` skips a kept answer (the re-check wants the truth now),
        but still joins a call already in flight: that one is as fresh as a new one.

        `admit` is called only when this caller is about to make the backend call itself (not on
        a hit, not when joining a flight); it may raise (a spent budget), and then no flight is
        opened, so nobody waits on a call that will not happen."""
        with self._lock:
            if not fresh:
                hit = self._entries.get(key)
                if hit is not None and hit[0] > self._clock():
                    return hit[1], True
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                if admit is not None:
                    admit()
                flight = self._flights[key] = _Flight()
            else:
                flight.waiters += 1
        if not leader:
            if flight.done.wait(MAX_WAIT_SECONDS) and flight.answer is not None:
                return flight.answer, True  # shared: this caller made no backend call
            if admit is not None:
                admit()  # asking itself after all: that call is this caller's
            return fetch(), False
        answer: SourceAnswer | None = None
        try:
            answer = fetch()
            return answer, False
        finally:
            with self._lock:
                if answer is not None and answer.verdict != UNKNOWN and self.ttl_seconds > 0:
                    self._store(key, answer)
                flight.answer = answer
                del self._flights[key]
            flight.done.set()

    def waiting(self, key: Hashable) -> int:
        """How many callers wait on the call in flight for `key` (0 when none is)."""
        with self._lock:
            flight = self._flights.get(key)
            return flight.waiters if flight is not None else 0

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _store(self, key: Hashable, answer: SourceAnswer) -> None:
        now = self._clock()
        if len(self._entries) >= self._max:
            for k in [k for k, (until, _) in self._entries.items() if until <= now]:
                del self._entries[k]
            while len(self._entries) >= self._max:
                del self._entries[next(iter(self._entries))]  # dicts keep insertion order: oldest first
        self._entries[key] = (now + self.ttl_seconds, answer)
