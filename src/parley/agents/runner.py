"""Runs one agent turn: the model/tool loop, mapped onto Parley's run events.

Model text becomes `agent_message_delta` (through `RunDeps.text`, which coalesces it); the
model's reasoning and each step of the loop become `agent_thinking`; tool calls are reported by
the tool dispatcher (`tool_executing` / `tool_completed`). The answer's content is exactly the
concatenation of the deltas that were sent.

The loop is ours, not `pydantic_ai.Agent`'s: per streamed token the agent graph, its event
stream wrappers and the SDK's chunk models cost about ten times what the rest of a run costs
(bench/README.md). It keeps pydantic-ai for what it is good at here: typed tools whose
arguments are validated from the function's type hints (`FunctionToolset`), run through
`DispatchingToolset`. The behaviour follows pydantic-ai's: an unknown tool or invalid
arguments are answered to the model as the tool's result so it can correct itself; an empty
answer is asked for again once ("Please return text."), then is the model's error.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError
from pydantic_ai.tools import RunContext
from pydantic_ai.toolsets.abstract import ToolsetTool
from pydantic_ai.usage import RunUsage

from parley.errors import LLMError
from parley.llm import LLMManager
from parley.llm_stream import StepResult, ToolCallRequest, stream_step
from parley.protocol import AgentThinking, Usage
from parley.store.queries import HistoryEntry
from parley.tools import DispatchingToolset, RunDeps

# Model requests one run may make (pydantic-ai's default request limit is 50 too): a model that
# keeps calling tools forever ends with an error instead of running to its deadline.
MAX_MODEL_REQUESTS = 50
ASK_FOR_TEXT = "Please return text."
EMPTY_ANSWER_RETRIES = 1


@dataclass(frozen=True)
class ChatAgent:
    """A named agent: its instructions and the tools it may call, on the configured model."""

    name: str
    instructions: str
    toolset: DispatchingToolset
    llm: LLMManager


@dataclass(frozen=True)
class AgentOutcome:
    content: str
    usage: Usage


def history_to_messages(history: Sequence[HistoryEntry]) -> list[dict[str, Any]]:
    """Earlier turns of the thread as chat messages (oldest first)."""
    return [
        {"role": message.role, "content": message.content}
        for message in history
        if message.role in ("user", "assistant")
    ]


async def run_agent(
    agent: ChatAgent,
    *,
    prompt: str,
    history: list[dict[str, Any]],
    deps: RunDeps,
) -> AgentOutcome:
    llm = agent.llm
    deps.post(AgentThinking(text=f"Reading the message and planning a reply ({llm.display_name})"))

    # pydantic-ai's context for tools, made only when a tool needs it (most runs call none).
    @functools.cache
    def ctx() -> RunContext[RunDeps]:
        return RunContext(deps=deps, model=llm.model, usage=RunUsage(), prompt=prompt)

    tools = await agent.toolset.listing(ctx)
    tool_schemas = [_tool_schema(tool) for tool in tools.values()]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": agent.instructions},
        *history,
        {"role": "user", "content": prompt},
    ]
    answer: list[str] = []

    def send_text(text: str) -> None:
        answer.append(text)
        deps.text(text)

    def think(text: str) -> None:
        # Posted, not awaited: it is called from the stream as it is read. The event log keeps
        # the run's order, so the thought still comes before the text that follows it.
        if text.strip():
            deps.post(AgentThinking(text=text.strip()))

    input_tokens = output_tokens = 0
    empty_answers = 0
    for _ in range(MAX_MODEL_REQUESTS):
        async with llm.guard():
            step: StepResult = await stream_step(
                llm.endpoint,
                model=llm.model_name,
                messages=messages,
                tools=tool_schemas,
                settings=dict(llm.model_settings or {}),
                on_text=send_text,
                on_reasoning=think,
            )
        input_tokens += step.input_tokens
        output_tokens += step.output_tokens
        usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
        if step.tool_calls:
            messages.append(_assistant_tool_calls(step))
            results = await asyncio.gather(
                *(_call_tool(agent.toolset, tools, ctx(), call) for call in step.tool_calls)
            )
            for call, result in zip(step.tool_calls, results, strict=True):
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
            names = ", ".join(dict.fromkeys(c.name for c in step.tool_calls if c.name in tools))
            if names:
                deps.post(AgentThinking(text=f"Reviewing the results of {names}"))
            continue
        if step.text:
            return AgentOutcome(content="".join(answer), usage=usage)
        if empty_answers >= EMPTY_ANSWER_RETRIES:
            raise LLMError(
                "the language model gave no usable answer (Exceeded maximum retries "
                f"({EMPTY_ANSWER_RETRIES}) for output; asked again: {ASK_FOR_TEXT})",
                retryable=True,
            )
        empty_answers += 1
        # As pydantic-ai asks: the empty answer is left out, the request is made again with a
        # system note after the conversation.
        messages.append({"role": "system", "content": ASK_FOR_TEXT})
    raise LLMError(
        f"the language model did not finish its answer within {MAX_MODEL_REQUESTS} requests",
        retryable=True,
    )


def _tool_schema(tool: ToolsetTool[RunDeps]) -> dict[str, Any]:
    definition = tool.tool_def
    function: dict[str, Any] = {
        "name": definition.name,
        "parameters": definition.parameters_json_schema,
    }
    if definition.description:
        function["description"] = definition.description
    return {"type": "function", "function": function}


def _assistant_tool_calls(step: StepResult) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": step.text or None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments or "{}"},
            }
            for call in step.tool_calls
        ],
    }


async def _call_tool(
    toolset: DispatchingToolset,
    tools: dict[str, ToolsetTool[RunDeps]],
    ctx: RunContext[RunDeps],
    call: ToolCallRequest,
) -> str:
    """The tool's result as the model reads it. A call the model got wrong (no such tool, bad
    arguments) is answered with what was wrong, never executed."""
    tool = tools.get(call.name)
    if tool is None:
        available = ", ".join(sorted(tools)) or "none"
        return f"Unknown tool name: {call.name!r}. Available tools: {available}"
    try:
        args = tool.args_validator.validate_json(call.arguments or "{}")
    except ValidationError as exc:
        errors = json.dumps(exc.errors(include_url=False, include_context=False), default=str)
        return f"Invalid arguments for tool {call.name!r}: {errors}. Fix the errors and try again."
    result = await toolset.call_tool(
        call.name, args, replace(ctx, tool_call_id=call.id, tool_name=call.name), tool
    )
    return result if isinstance(result, str) else json.dumps(result, default=str)
