"""`broker-cli serve` under tracemalloc, for bench/soak.py --tracemalloc.

SIGUSR1 writes a heap snapshot to $SOAK_SNAPSHOT_DIR: `warm.snap` the first time, `end.snap`
after, each followed by an empty `<name>.done` once the file is complete.
"""

from __future__ import annotations

import os
import signal
import sys
import tracemalloc
from pathlib import Path
from typing import Any

tracemalloc.start(1)
_taken: list[str] = []


def _dump(_signum: int, _frame: Any) -> None:
    name = "warm" if not _taken else "end"
    _taken.append(name)
    directory = Path(os.environ["SOAK_SNAPSHOT_DIR"])
    tracemalloc.take_snapshot().dump(str(directory / f"{name}.snap"))
    (directory / f"{name}.done").touch()


signal.signal(signal.SIGUSR1, _dump)

from broker.cli.main import main  # noqa: E402  # after tracemalloc.start: the broker's own allocations are traced

sys.argv = ["broker-cli", "serve", *sys.argv[1:]]
sys.exit(main())
