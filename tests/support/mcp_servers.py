"""MCP servers built with the official MCP Python SDK, protected by the broker's tokens
(`broker.mcp.verifier`), served by a real uvicorn on a free loopback port."""

from __future__ import annotations

import threading
import time
import warnings

import uvicorn
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer

from broker.mcp.verifier import BrokerTokenVerifier
from tests.support.ports import free_port


class McpServer:
    """One MCP server with one tool, `whoami`, which answers the token's subject and scopes."""

    def __init__(self, name: str, broker_issuer: str, required_scopes: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.calls: list[str] = []
        verifier = BrokerTokenVerifier(issuer=broker_issuer, resource=self.url, introspect=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server: MCPServer = MCPServer(name, token_verifier=verifier, auth=AuthSettings(
                issuer_url=broker_issuer, resource_server_url=self.url, required_scopes=required_scopes,
                validate_token_resource=True))

        @server.tool()
        def whoami() -> str:
            self.calls.append(name)
            return f"{name}: ok"

        app = server.streamable_http_app(host="127.0.0.1")
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> McpServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("MCP server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
