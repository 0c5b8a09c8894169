"""`broker-cli hook pre-tool-use`: the tool-call gate as a Claude Code command hook.

Reads the hook input (JSON) on stdin, asks `POST /v1/hooks/pre-tool-use` with the session
token, and answers as command hooks do: allow and ask as JSON on stdout with exit 0; deny as
the reason on stderr with exit 2, which blocks the call and shows the reason to the model.
Fails closed: no session token, no broker, or an answer it cannot read blocks the call too.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from broker.cli.agent import AgentClient, HelperError

BLOCK = 2  # Claude Code: exit 2 blocks the tool call; stderr goes to the model

hook_app = typer.Typer(help="Tool-call gate for agent runtimes' hooks.", no_args_is_help=True)


def _block(reason: str) -> None:
    sys.stderr.write(f"jit-broker: {reason}\n")
    raise typer.Exit(BLOCK)


def _decide(raw: str) -> dict[str, Any]:
    try:
        hook = json.loads(raw)
    except ValueError:
        raise HelperError("the hook input on stdin is not JSON", "invalid-json") from None
    if not isinstance(hook, dict):
        raise HelperError("the hook input on stdin is not a JSON object", "invalid-json")
    client = AgentClient.from_environment()
    response = client.call("POST", "/v1/hooks/pre-tool-use", json=hook)
    if response.status_code != 200:
        try:
            err = response.json()["error"]
            raise HelperError(f"{err['code']}: {err['message']}", str(err["code"]))
        except (ValueError, KeyError, TypeError):
            raise HelperError(f"the broker answered HTTP {response.status_code}", f"http-{response.status_code}") from None
    answer: dict[str, Any] = response.json()
    return answer


@hook_app.command("pre-tool-use")
def pre_tool_use() -> None:
    """Claude Code PreToolUse command hook: stdin JSON in; exit 0 with JSON (allow/ask) or exit 2 (deny)."""
    try:
        answer = _decide(sys.stdin.read())
        decision = answer["hookSpecificOutput"]["permissionDecision"]
        reason = str(answer["hookSpecificOutput"].get("permissionDecisionReason") or "")
    except HelperError as exc:
        _block(f"tool call blocked: the broker could not decide ({exc.message})")
        return
    except (KeyError, TypeError):
        _block("tool call blocked: the broker's answer is not a hook decision")
        return
    if decision == "deny":
        _block(f"denied by policy: {reason}")
    if decision not in ("allow", "ask"):
        _block(f"tool call blocked: unknown decision {decision!r}")
    sys.stdout.write(json.dumps(answer) + "\n")
