"""Free loopback ports, asked of the OS (never fixed numbers: eight suites share this machine)."""

from __future__ import annotations

import contextlib
import socket


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int, *, consecutive: bool = False) -> list[int]:
    """`n` ports free right now on 127.0.0.1; `consecutive` where a server takes port+1 too
    (OpenBao's dev mode puts its cluster listener there)."""
    for _ in range(50):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            ports = [int(first.getsockname()[1])]
            try:
                for i in range(1, n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", ports[0] + i if consecutive else 0))
                    ports.append(int(s.getsockname()[1]))
            except OSError:
                continue
            return ports
    raise RuntimeError("no free ports on 127.0.0.1")
