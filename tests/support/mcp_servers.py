"""MCP servers built with the official MCP Python SDK, protected by the broker's tokens
(`broker.mcp.verifier`), served by a real uvicorn on a free loopback port."""

from __future__ import annotations

import json
import threading
import time
import warnings
from typing import Any

import uvicorn
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from starlette.concurrency import run_in_threadpool

from broker.mcp.verifier import BrokerTokenVerifier
from tests.support.ports import free_port


class ScopeChallenge:
    """What an MCP server does for a tool that needs more than the token carries (MCP authorization,
    "Scope challenge handling"): 403 with `error="insufficient_scope"` and the scopes it needs, so
    the client asks the authorization server again."""

    def __init__(self, app: Any, verifier: BrokerTokenVerifier, tool: str, scopes: str, metadata_url: str) -> None:
        self.app, self.verifier, self.tool, self.scopes, self.metadata_url = app, verifier, tool, scopes, metadata_url

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            rpc = json.loads(body)
        except ValueError:
            rpc = None
        if isinstance(rpc, dict) and rpc.get("method") == "tools/call" and (rpc.get("params") or {}).get("name") == self.tool:
            headers = dict(scope["headers"])
            token = headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
            claims = await run_in_threadpool(self.verifier.check, token)
            held = set(str((claims or {}).get("scope") or "").split())
            if claims is not None and not set(self.scopes.split()) <= held:
                challenge = (f'Bearer error="insufficient_scope", scope="{self.scopes}", '
                             f'resource_metadata="{self.metadata_url}", error_description="{self.tool} needs {self.scopes}"')
                await send({"type": "http.response.start", "status": 403, "headers": [
                    (b"www-authenticate", challenge.encode()), (b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"error": "insufficient_scope"}'})
                return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class McpServer:
    """An MCP server with a tool `whoami` (the server's required scopes) and, when `admin_scopes`
    is given, a tool `admin` that needs those scopes (a scope challenge below them)."""

    def __init__(self, name: str, broker_issuer: str, required_scopes: list[str],
                 admin_scopes: str | None = None) -> None:
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

        @server.tool()
        def admin() -> str:
            self.calls.append(name + ":admin")
            return f"{name}: admin ok"

        app: Any = server.streamable_http_app(host="127.0.0.1")
        if admin_scopes is not None:
            metadata_url = f"http://127.0.0.1:{self.port}/.well-known/oauth-protected-resource/mcp"
            app = ScopeChallenge(app, verifier, "admin", admin_scopes, metadata_url)
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
