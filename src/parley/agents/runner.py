"""Runs one agent turn and maps pydantic-ai's event stream onto Parley's run events.

Model text becomes `agent_message_delta`; model reasoning parts and each step of the loop
become `agent_thinking`; tool calls are reported by the tool dispatcher. The answer's content
is exactly the concatenation of the deltas that were sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic_ai import Agent, AgentRunResultEvent
from pydantic_ai.messages import (
    FunctionToolResultEvent,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    PartDeltaEvent,
    PartEndEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    ThinkingPart,
    UserPromptPart,
)

from parley.protocol import AgentThinking, Usage
from parley.store.models import Message
from parley.tools import RunDeps


@dataclass(frozen=True)
class AgentOutcome:
    content: str
    usage: Usage


def history_to_messages(history: Sequence[Message]) -> list[ModelMessage]:
    """Earlier turns of the thread as model messages (oldest first)."""
    messages: list[ModelMessage] = []
    for message in history:
        if message.role == "user":
            messages.append(ModelRequest(parts=[UserPromptPart(message.content)]))
        elif message.role == "assistant":
            messages.append(ModelResponse(parts=[TextPart(message.content)]))
    return messages


async def run_agent(
    agent: Agent[RunDeps, str],
    *,
    model_label: str,
    prompt: str,
    history: list[ModelMessage],
    deps: RunDeps,
) -> AgentOutcome:
    await deps.emit(AgentThinking(text=f"Reading the message and planning a reply ({model_label})"))
    answer: list[str] = []
    tools_since_last_step: list[str] = []

    def send_text(text: str) -> None:
        if text:
            answer.append(text)
            deps.text(text)

    async def announce_next_step() -> None:
        if tools_since_last_step:
            names = ", ".join(dict.fromkeys(tools_since_last_step))
            tools_since_last_step.clear()
            await deps.emit(AgentThinking(text=f"Reviewing the results of {names}"))

    output = ""
    input_tokens = output_tokens = 0
    async with agent.run_stream_events(prompt, message_history=history, deps=deps) as events:
        async for event in events:
            if isinstance(event, PartStartEvent):
                await announce_next_step()
                if isinstance(event.part, TextPart):
                    send_text(event.part.content)
            elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
                send_text(event.delta.content_delta)
            elif isinstance(event, PartEndEvent) and isinstance(event.part, ThinkingPart):
                if event.part.content.strip():
                    await deps.emit(AgentThinking(text=event.part.content.strip()))
            elif isinstance(event, FunctionToolResultEvent):
                tools_since_last_step.append(event.part.tool_name)
            elif isinstance(event, AgentRunResultEvent):
                output = event.result.output
                usage = event.result.usage
                input_tokens, output_tokens = usage.input_tokens, usage.output_tokens
    if not answer and output:
        # A provider that did not stream still gives the client its text as one delta.
        send_text(output)
    return AgentOutcome(
        content="".join(answer),
        usage=Usage(input_tokens=input_tokens or 0, output_tokens=output_tokens or 0),
    )
