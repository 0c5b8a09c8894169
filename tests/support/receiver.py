"""A notification receiver on a loopback port: verifies X-Broker-Signature like a real one
would, keeps what it accepted, and can be told to fail the next deliveries."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from broker.identity.webhooks import HEADER, verify


class Receiver:
    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.events: list[dict[str, Any]] = []  # accepted, in arrival order
        self.rejected: list[str] = []
        self.fail_next = 0
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    if receiver.fail_next > 0:
                        receiver.fail_next -= 1
                        self.send_response(503)
                        self.end_headers()
                        return
                    try:
                        verify(raw, self.headers.get(HEADER), [receiver.secret], tolerance_seconds=300)
                    except Exception as exc:  # noqa: BLE001 - a receiver refuses anything unsigned
                        receiver.rejected.append(str(exc))
                        self.send_response(401)
                        self.end_headers()
                        return
                    event = json.loads(raw)
                    event["_headers"] = {"event": self.headers.get("X-Broker-Event"),
                                         "delivery": self.headers.get("X-Broker-Delivery")}
                    receiver.events.append(event)
                    receiver.arrived.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/approvals"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.events) >= count, timeout)
            return list(self.events)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver("whsec-approvals-test")
    yield r
    r.close()
