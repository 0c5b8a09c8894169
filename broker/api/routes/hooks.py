"""The tool-call gate for agent runtimes: Claude Code's PreToolUse hook, answered from the policy."""

from __future__ import annotations

from fastapi import APIRouter, Response

from broker.api.deps import AgentCaller, BrokerDep
from broker.api.schemas.common import error_responses
from broker.api.schemas.hooks import PreToolUseInput, PreToolUseOutput
from broker.hooks.service import HookInput, pre_tool_use

router = APIRouter(prefix="/v1/hooks", tags=["hooks"])
ERRORS = error_responses(400, 401, 403, 413, 422)


@router.post("/pre-tool-use", response_model=PreToolUseOutput, responses=ERRORS)
def pre_tool_use_hook(body: PreToolUseInput, broker: BrokerDep, caller: AgentCaller, response: Response) -> PreToolUseOutput:
    """allow / ask / deny for one tool call, with the reason; every answer is audited.

    200 carries every decision, deny included (Claude Code reads the JSON of a 2xx answer only).
    Use it as an `http` hook with the session token in `Authorization`, or through
    `broker-cli hook pre-tool-use` as a `command` hook, which fails closed when the broker is away.
    """
    hook = HookInput(tool_name=body.tool_name, tool_input=body.tool_input, agent_session_id=body.session_id,
                     tool_use_id=body.tool_use_id, cwd=body.cwd, permission_mode=body.permission_mode)
    response.headers["Cache-Control"] = "no-store"
    return PreToolUseOutput.model_validate(pre_tool_use(broker, caller, hook))
