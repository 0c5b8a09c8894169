"""`broker-cli serve` under instrumentation, for bench/soak.py --tracemalloc / --probe.

SIGUSR1 writes a tracemalloc heap snapshot to $SOAK_SNAPSHOT_DIR: `warm.snap` the first time,
`end.snap` after, each followed by an empty `<name>.done` once the file is complete. Traces keep
$SOAK_TRACEMALLOC_FRAMES frames (default 1; 0: tracemalloc is not started, for --probe alone).

SIGUSR2 appends one JSON line to $SOAK_SNAPSHOT_DIR/probe.jsonl: where the process's memory is,
as seen from inside: RSS (anonymous and file-backed), glibc malloc's own view (mallinfo2: bytes
in use and bytes free but kept, over all arenas; the number of arenas), Python's allocated
blocks, tracemalloc's traced total when tracing, and live objects counted by type (gc). Telling
these apart is the point: Python objects that pile up show in blocks and type counts; a C
library's allocations show in malloc's bytes in use only; fragmentation shows as malloc's free
bytes (or RSS) growing while bytes in use do not.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import json
import os
import re
import signal
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

FRAMES = int(os.environ.get("SOAK_TRACEMALLOC_FRAMES", "1"))
if FRAMES > 0:
    tracemalloc.start(FRAMES)
_taken: list[str] = []
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_libc.fopen.restype = ctypes.c_void_p  # a FILE *, not an int (the default would truncate it)
_libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
_libc.fclose.argtypes = [ctypes.c_void_p]
_libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _dump(_signum: int, _frame: Any) -> None:
    name = "warm" if not _taken else "end"
    _taken.append(name)
    directory = Path(os.environ["SOAK_SNAPSHOT_DIR"])
    tracemalloc.take_snapshot().dump(str(directory / f"{name}.snap"))
    (directory / f"{name}.done").touch()


def _malloc() -> dict[str, int]:
    out: dict[str, int] = {}
    if hasattr(_libc, "mallinfo2"):
        _libc.mallinfo2.restype = _MallInfo2
        info = _libc.mallinfo2()
        out = {"malloc_in_use_kb": info.uordblks // 1024, "malloc_free_kb": info.fordblks // 1024,
               "malloc_mmapped_kb": info.hblkhd // 1024, "malloc_arena_kb": info.arena // 1024}
    path = Path(os.environ["SOAK_SNAPSHOT_DIR"]) / "malloc_info.xml"
    libc_file = _libc.fopen(str(path).encode(), b"w")
    if libc_file:
        _libc.malloc_info(0, libc_file)
        _libc.fclose(libc_file)
        out["malloc_arenas"] = len(re.findall(r"<heap nr=", path.read_text()))
    return out


def _pymalloc() -> dict[str, int]:
    """Python's small-object allocator (arenas it holds from the OS, bytes in live blocks), from
    sys._debugmallocstats, which writes to the C stderr: redirected to a file for the call."""
    path = Path(os.environ["SOAK_SNAPSHOT_DIR"]) / "pymalloc.txt"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with path.open("w") as f:
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    text = path.read_text()
    out = {}
    for key, label in (("pymalloc_arenas", "# arenas allocated current"),
                       ("pymalloc_arenas_highwater", "# arenas highwater mark"),
                       ("pymalloc_used_kb", "# bytes in allocated blocks"),
                       ("pymalloc_free_kb", "# bytes in available blocks"),
                       ("pymalloc_empty_pools_kb", "unused pools")):
        found = re.search(re.escape(label) + r"[^=]*=\s*([\d,]+)", text)
        if found:
            value = int(found.group(1).replace(",", ""))
            out[key] = value // 1024 if key.endswith("_kb") else value
    return out


def _caches(objects: list[Any]) -> dict[str, Any]:
    """Bounded caches that churn (misses keep growing while full) keep allocating entries that
    outlive the requests around them: the pattern that fragments an allocator. functools'
    lru_caches (hits, misses, size), psycopg's prepared-statement bookkeeping, SQLAlchemy's
    compiled-statement caches."""
    out: dict[str, Any] = {}
    prepared = [0, 0]
    for o in objects:
        kind = type(o)
        if kind.__name__ == "_lru_cache_wrapper":
            info = o.cache_info()
            if info.misses > 100:
                name = f"{getattr(o, '__module__', '?')}.{getattr(o, '__qualname__', '?')}"
                out[f"lru {name}"] = [info.hits, info.misses, info.currsize, info.maxsize]
        elif kind.__name__ == "PrepareManager":
            prepared[0] += len(o._counts)
            prepared[1] += len(o._names)
        elif kind.__name__ == "LRUCache" and kind.__module__.startswith("sqlalchemy"):
            out[f"sqlalchemy LRUCache {id(o):x}"] = [len(o), o.capacity]
    out["psycopg prepare counts, prepared"] = prepared
    return out


def _probe(_signum: int, _frame: Any) -> None:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = {k: int(status[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile") if k in status}
    objects = gc.get_objects()
    by_type = collections.Counter(type(o).__name__ for o in objects)
    caches = _caches(objects)
    del objects
    record = {"t": time.time(), **kb, **_malloc(), **_pymalloc(), "py_blocks": sys.getallocatedblocks(),
              "gc_objects": sum(by_type.values()), "threads": threading.active_count(),
              "traced_kb": tracemalloc.get_traced_memory()[0] // 1024 if tracemalloc.is_tracing() else None,
              "caches": caches, "types": dict(by_type.most_common(60))}
    with (Path(os.environ["SOAK_SNAPSHOT_DIR"]) / "probe.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


signal.signal(signal.SIGUSR1, _dump)
signal.signal(signal.SIGUSR2, _probe)

from broker.cli.main import main  # noqa: E402  # after tracemalloc.start: the broker's own allocations are traced

sys.argv = ["broker-cli", "serve", *sys.argv[1:]]
sys.exit(main())
