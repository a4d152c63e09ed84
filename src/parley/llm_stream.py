"""One streamed chat-completions request to an OpenAI-compatible model: the hot path per token.

The request goes out through `ChatCompletionsEndpoint` (llm_http.py: the OpenAI SDK's retry and
timeout behaviour, without its per-request cost); its body is read here, line by line, with
pydantic-core's JSON parser (jiter: a quarter of `json.loads`'s cost on a chunk).
Why not the SDK's chunk objects or pydantic-ai's streamed response: a streamed token is the
unit of work a chat server does most, and building a pydantic `ChatCompletionChunk` plus
pydantic-ai's part/event objects and its stack of async-iterator wrappers cost about ten times
more CPU per token than reading the JSON (bench/README.md has the measurement). A token here
costs one `from_json` and one callback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import from_json

from parley.llm_http import ChatCompletionsEndpoint, sse_lines


class StreamFailed(Exception):
    """The provider reported an error in the middle of its streamed answer (an SSE `error`
    event): an outage of the provider, after some of the answer may have been sent."""


@dataclass
class ToolCallRequest:
    """A tool call the model asked for; `arguments` is the JSON text as the model wrote it."""

    id: str
    name: str
    arguments: str = ""


@dataclass
class StepResult:
    """What one model request produced."""

    text: str
    tool_calls: list[ToolCallRequest] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0


async def stream_step(
    endpoint: ChatCompletionsEndpoint,
    *,
    model: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    settings: dict[str, Any],
    on_text: Callable[[str], None],
    on_reasoning: Callable[[str], Awaitable[None]],
) -> StepResult:
    """Send `messages` and stream the answer: text goes to `on_text` as it arrives; reasoning
    text (some providers stream the model's thoughts first) goes to `on_reasoning` once it is
    complete, before the text that follows it; tool calls are collected and returned with the
    token usage (when reported)."""
    text: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, ToolCallRequest] = {}
    usage: dict[str, Any] = {}
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        **settings,
    }
    if tools:
        body["tools"] = tools
    response = await endpoint.open_stream(body)
    try:
        async for lines in sse_lines(response):
            for line in lines:
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    # Read on to the end of the body (nothing follows but the chunked
                    # terminator), so the connection goes back to the pool, not closed.
                    continue
                chunk = from_json(data)
                if "error" in chunk:
                    raise StreamFailed(_error_text(chunk["error"]))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if thought := delta.get("reasoning_content") or delta.get("reasoning"):
                        reasoning.append(thought)
                    if reasoning and (delta.get("content") or delta.get("tool_calls")):
                        await on_reasoning("".join(reasoning))
                        reasoning.clear()
                    if content := delta.get("content"):
                        text.append(content)
                        on_text(content)
                    for call in delta.get("tool_calls") or ():
                        _add_tool_call_delta(calls, call)
    finally:
        response.release()
    if reasoning:
        await on_reasoning("".join(reasoning))
    return StepResult(
        text="".join(text),
        tool_calls=[calls[i] for i in sorted(calls)],
        input_tokens=int(usage.get("prompt_tokens") or 0),
        output_tokens=int(usage.get("completion_tokens") or 0),
    )


def _add_tool_call_delta(calls: dict[int, ToolCallRequest], delta: dict[str, Any]) -> None:
    # A call arrives as a first delta with its id and name, then pieces of its arguments
    # (providers split them anywhere), all under the same `index`.
    index = int(delta.get("index") or 0)
    function = delta.get("function") or {}
    call = calls.get(index)
    if call is None:
        call = calls[index] = ToolCallRequest(
            id=delta.get("id") or f"call_{index}", name=function.get("name") or ""
        )
    elif function.get("name"):
        call.name += function["name"]
    if pieces := function.get("arguments"):
        call.arguments += pieces


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code") or "error"
        return f"{kind}: {str(error.get('message') or '')[:200]}"
    return str(error)[:200]
