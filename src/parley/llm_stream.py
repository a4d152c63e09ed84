"""One streamed chat-completions request to an OpenAI-compatible model: the hot path per token.

The request goes out through `ChatCompletionsEndpoint` (llm_http.py: the OpenAI SDK's retry and
timeout behaviour, without its per-request cost); its body is pushed here as it arrives, and
read line by line with pydantic-core's JSON parser (jiter: a quarter of `json.loads`'s cost on
a chunk).
Why not the SDK's chunk objects or pydantic-ai's streamed response: a streamed token is the
unit of work a chat server does most, and building a pydantic `ChatCompletionChunk` plus
pydantic-ai's part/event objects and its stack of async-iterator wrappers cost about ten times
more CPU per token than reading the JSON (bench/README.md has the measurement). A token here
costs one `from_json` and one callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import from_json

from parley.llm_http import ChatCompletionsEndpoint, read_body


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
    on_reasoning: Callable[[str], None],
) -> StepResult:
    """Send `messages` and stream the answer: text goes to `on_text` as it arrives; reasoning
    text (some providers stream the model's thoughts first) goes to `on_reasoning` once it is
    complete, before the text that follows it; tool calls are collected and returned with the
    token usage (when reported)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        **settings,
    }
    if tools:
        body["tools"] = tools
    reader = _StreamReader(on_text, on_reasoning)
    response = await endpoint.open_stream(body)
    try:
        # Read to the end of the body, past `[DONE]` (nothing follows but the chunked
        # terminator), so that the connection is kept for the next request.
        await read_body(response, reader.feed)
    finally:
        response.release()
    return reader.result()


class _StreamReader:
    """The answer's server-sent events, fed as the body arrives (one network read at a time;
    a model sends a token per read): called from the connection's protocol, so it never
    waits."""

    def __init__(self, on_text: Callable[[str], None], on_reasoning: Callable[[str], None]):
        self._on_text = on_text
        self._on_reasoning = on_reasoning
        self._rest = b""
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, ToolCallRequest] = {}
        self._usage: dict[str, Any] = {}

    def feed(self, data: bytes) -> None:
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, `event:` lines
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            chunk = from_json(payload)
            if "error" in chunk:
                raise StreamFailed(_error_text(chunk["error"]))
            if chunk.get("usage"):
                self._usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if thought := delta.get("reasoning_content") or delta.get("reasoning"):
                    self._reasoning.append(thought)
                if self._reasoning and (delta.get("content") or delta.get("tool_calls")):
                    self._reasoning_done()
                if content := delta.get("content"):
                    self._text.append(content)
                    self._on_text(content)
                for call in delta.get("tool_calls") or ():
                    _add_tool_call_delta(self._calls, call)

    def result(self) -> StepResult:
        if self._rest.strip():
            self.feed(b"\n")  # a last line without its line end
        if self._reasoning:
            self._reasoning_done()
        return StepResult(
            text="".join(self._text),
            tool_calls=[self._calls[i] for i in sorted(self._calls)],
            input_tokens=int(self._usage.get("prompt_tokens") or 0),
            output_tokens=int(self._usage.get("completion_tokens") or 0),
        )

    def _reasoning_done(self) -> None:
        self._on_reasoning("".join(self._reasoning))
        self._reasoning.clear()


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
