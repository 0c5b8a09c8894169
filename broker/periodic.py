"""Background loops of the broker (sweeper, permission re-check, outbox): one thread each.

A pass starts every `interval` seconds (a long pass does not push the next one further out);
a pass that raises is logged and the next one runs; `wake()` starts the next pass now; each
pass's log lines share one request id.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

from broker.logs import REQUEST_ID


class Periodic:
    """Runs `work` every `interval` seconds on a thread called `name`, logging to `log`."""

    def __init__(self, name: str, interval: float, work: Callable[[], object], log: logging.Logger) -> None:
        self.name = name
        self._interval = interval
        self._work = work
        self._log = log
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Something is due in this process now: run the next pass at once instead of at the tick."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            token = REQUEST_ID.set(f"{self.name}_{secrets.token_hex(6)}")  # ties a pass's log lines together
            try:
                self._work()
            except Exception:  # noqa: BLE001  # one bad pass must not end the loop (logged with its traceback)
                self._log.exception("%s pass failed; next pass in %.1fs", self.name, self._interval)
            finally:
                REQUEST_ID.reset(token)
            self._wake.wait(max(0.0, self._interval - (time.monotonic() - started)))
            self._wake.clear()
