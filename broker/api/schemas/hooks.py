"""The tool-call gate's bodies: Claude Code's PreToolUse hook input and answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints


class PreToolUseInput(BaseModel):
    """Claude Code's PreToolUse hook input. Fields Claude Code adds later are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    hook_event_name: Literal["PreToolUse"] | None = Field(default=None, description="PreToolUse; other events are refused")
    tool_name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    tool_input: dict[str, Any] = Field(description="the tool's arguments, as the model wrote them")
    session_id: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        default=None, description="Claude Code's own session id (recorded; the broker session comes from the token)")
    tool_use_id: Annotated[str, StringConstraints(max_length=256)] | None = None
    cwd: Annotated[str, StringConstraints(max_length=4096)] | None = None
    permission_mode: Annotated[str, StringConstraints(max_length=64)] | None = None
    transcript_path: Annotated[str, StringConstraints(max_length=4096)] | None = None


class HookSpecificOutput(BaseModel):
    hookEventName: Literal["PreToolUse"]
    permissionDecision: Literal["allow", "ask", "deny"]
    permissionDecisionReason: str


class PreToolUseOutput(BaseModel):
    """What a Claude Code PreToolUse hook answers (the same JSON for an http hook and a command hook)."""

    hookSpecificOutput: HookSpecificOutput
