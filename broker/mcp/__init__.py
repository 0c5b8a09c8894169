"""MCP: what the broker gives the authors of MCP servers (docs/mcp.md)."""
