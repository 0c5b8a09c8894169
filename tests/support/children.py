"""Child processes of the suite (and of bench/): they die with their parent, and stop politely first."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable
from typing import Any


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn`: on Linux the child gets `sig` when its parent dies, so no server
    outlives a killed run.

    The signal follows the *thread* that forked the child, so launch from a thread that
    outlives the process (the test's own), never from a short-lived pool thread.
    """

    def arrange() -> None:
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG

    return arrange


def terminate(proc: subprocess.Popen[Any] | None, *, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; a process already gone is fine. By pid:
    only the process this suite started."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
