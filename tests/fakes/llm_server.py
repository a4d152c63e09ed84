"""A scripted OpenAI-compatible chat-completions server on loopback, for tests.

It is a real HTTP server (uvicorn in a background thread) speaking the `/v1/chat/completions`
wire format, streamed (SSE) or not, so Parley's real client code is exercised end to end.

Scripting is by content, not by shared state: a test registers a *trigger* word and a list of
turns; any request whose latest user message contains the trigger is answered by those turns,
the turn chosen by how many tool results follow that user message. This keeps the server
stateless per request, so tests can share one instance and run in parallel (a `Flaky` turn
counts the requests that reached it: what a retry of the same request sees).

It is as hard as real providers: tool-call arguments arrive split over many chunks, usage only
when the request asks for it, failures can come after part of the answer has streamed, and
429s carry `Retry-After`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass(frozen=True)
class Text:
    """Answer with `text`, streamed in chunks of `chunk` characters, `delay_s` apart.

    `fail_after` ends the stream after that many characters of `text`, the way real providers
    fail mid-answer: with an SSE `error` event (`failure="error_event"`, what OpenAI sends on a
    server error after the headers) or by dropping the connection (`failure="disconnect"`).
    `usage=False` never reports usage (like llama.cpp's server when streaming); otherwise usage
    is sent only when the request asks for it (`stream_options.include_usage`), as OpenAI does.
    `pause_after` stops sending after that many characters for `pause_s` (a provider that
    stalls mid-answer).
    """

    text: str
    chunk: int = 8
    delay_s: float = 0.0
    reasoning: str | None = None
    fail_after: int | None = None
    failure: str = "error_event"
    usage: bool = True
    pause_after: int | None = None
    pause_s: float = 0.0


@dataclass(frozen=True)
class ToolCall:
    """Ask for one or more tool calls: `calls` is a list of (tool name, arguments).

    Streamed like real providers do: the first chunk of each call carries its id and name, the
    JSON arguments follow in pieces of `arg_chunk` characters over many chunks."""

    calls: list[tuple[str, dict[str, Any]]]
    arg_chunk: int = 3


@dataclass(frozen=True)
class HttpError:
    """Refuse the request with `status` and an OpenAI-style error body (and `Retry-After`,
    and any other `headers`, e.g. `retry-after-ms` or `x-should-retry`)."""

    status: int
    message: str = "scripted failure"
    retry_after: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Hang:
    """Accept the request and send nothing for `seconds` (a provider that stalls)."""

    seconds: float


@dataclass(frozen=True)
class Flaky:
    """`first` for the first `times` requests that reach this turn, then `then` (a provider
    that recovers: what a retry sees)."""

    first: Text | ToolCall | HttpError | Hang
    then: Text | ToolCall | HttpError | Hang
    times: int = 1


Turn = Text | ToolCall | HttpError | Hang | Flaky


@dataclass
class Script:
    turns: list[Turn]
    # Requests seen per turn index, for `Flaky` turns.
    attempts: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    at: float  # time.monotonic()
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeLLM:
    """The server's state: scripts by trigger and a log of the requests it saw.

    Tests script it from their own thread while the server thread reads it: every access to
    `scripts` and the request logs holds `_lock`.
    """

    scripts: dict[str, Script] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    # When set, every request must carry `Authorization: Bearer <api_key>`, else 401.
    api_key: str | None = None
    # Requests answered 401 for a wrong or missing key (they are not in `requests`).
    refused: int = 0
    # When set, /models lists exactly these and a completion for another model gets 404.
    models: list[str] | None = None
    # False: /models answers 404, as on providers that do not list their models.
    lists_models: bool = True
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def script(self, trigger: str, *turns: Turn) -> str:
        """Register `turns` for messages containing `trigger`; returns the trigger."""
        with self._lock:
            self.scripts[trigger] = Script(list(turns))
        return trigger

    def requests_with(self, trigger: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if trigger in _last_user_text(r)]

    def seen_with(self, trigger: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if trigger in _last_user_text(s.body)]

    def _record(self, headers: dict[str, str], body: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(body)
            self.seen.append(Seen(time.monotonic(), headers, body))

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        # The socket is bound here and handed to uvicorn, so no other process can take the port
        # between choosing and binding it. A restart after stop() binds the same port again: a
        # provider that went away and came back.
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        self.port = int(listener.getsockname()[1])
        config = uvicorn.Config(
            _build_app(self), host=self.host, port=self.port, log_level="warning", lifespan="off"
        )
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: server.run(sockets=[listener]), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake LLM server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _turn_index(body: dict[str, Any]) -> int:
    """How many assistant turns already answered the latest user message."""
    count = 0
    for message in reversed(body.get("messages", [])):
        role = message.get("role")
        if role == "user":
            break
        if role == "assistant":
            count += 1
    return count


def _choose_turn(fake: FakeLLM, body: dict[str, Any]) -> Text | ToolCall | HttpError | Hang:
    text = _last_user_text(body)
    with fake._lock:
        for trigger, script in fake.scripts.items():
            if trigger in text:
                index = min(_turn_index(body), len(script.turns) - 1)
                turn = script.turns[index]
                if isinstance(turn, Flaky):
                    attempt = script.attempts.get(index, 0)
                    script.attempts[index] = attempt + 1
                    return turn.first if attempt < turn.times else turn.then
                return turn
    # Unscripted: a deterministic answer computed from the prompt, so tests can check it.
    return Text(f"echo: {text}")


def _refuse_key(fake: FakeLLM, request: Request) -> Response | None:
    if fake.api_key is None or request.headers.get("authorization") == f"Bearer {fake.api_key}":
        return None
    with fake._lock:
        fake.refused += 1
    error = {"message": "Incorrect API key provided", "type": "invalid_request_error"}
    return JSONResponse({"error": {**error, "code": "invalid_api_key"}}, status_code=401)


def _build_app(fake: FakeLLM) -> Starlette:
    async def completions(request: Request) -> Response:
        if (refused := _refuse_key(fake, request)) is not None:
            return refused
        body = await request.json()
        if fake.models is not None and body.get("model") not in fake.models:
            error = {"message": "The model does not exist", "code": "model_not_found"}
            return JSONResponse({"error": error}, status_code=404)
        fake._record(dict(request.headers), body)
        turn = _choose_turn(fake, body)
        if isinstance(turn, Hang):
            await asyncio.sleep(turn.seconds)
            return JSONResponse({"error": {"message": "hung"}}, status_code=504)
        if isinstance(turn, HttpError):
            error = {"error": {"message": turn.message, "type": "server_error"}}
            headers = dict(turn.headers)
            if turn.retry_after:
                headers["retry-after"] = turn.retry_after
            return JSONResponse(error, status_code=turn.status, headers=headers)
        model = body.get("model", "fake-model")
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(turn, model, usage), media_type="text/event-stream")
        return JSONResponse(_completion(turn, model))

    async def models(request: Request) -> Response:
        if (refused := _refuse_key(fake, request)) is not None:
            return refused
        if not fake.lists_models:
            return JSONResponse({"error": {"message": "not found"}}, status_code=404)
        names = fake.models if fake.models is not None else ["fake-model"]
        data = [{"id": name, "object": "model"} for name in names]
        return JSONResponse({"object": "list", "data": data})

    async def moved(request: Request) -> Response:
        # A base URL that moved: `/moved/<path>` answers 307 (method and body kept) to `/<path>`.
        return Response(status_code=307, headers={"location": "/" + request.path_params["path"]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/moved/{path:path}", moved, methods=["GET", "POST"]),
        ]
    )


_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def _completion(turn: Text | ToolCall, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None}
    finish = "stop"
    if isinstance(turn, Text):
        message["content"] = turn.text
    else:
        message["tool_calls"] = [
            _tool_call(i, name, args) for i, (name, args) in enumerate(turn.calls)
        ]
        finish = "tool_calls"
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": _USAGE,
    }


def _tool_call(index: int, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "index": index,
        "id": f"call_{uuid.uuid4().hex[:12]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args)},
    }


class DroppedConnection(Exception):
    """Raised inside a streaming response: uvicorn then drops the connection mid-body."""


async def _sse(turn: Text | ToolCall, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    ident = f"chatcmpl-{uuid.uuid4().hex}"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        payload = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(payload)}\n\n".encode()

    yield chunk({"role": "assistant", "content": ""})
    if isinstance(turn, Text):
        if turn.reasoning:
            yield chunk({"reasoning_content": turn.reasoning})
        end = len(turn.text) if turn.fail_after is None else turn.fail_after
        for start in range(0, end, turn.chunk):
            if turn.delay_s:
                await asyncio.sleep(turn.delay_s)
            if turn.pause_after is not None and start >= turn.pause_after:
                await asyncio.sleep(turn.pause_s)
                turn = replace(turn, pause_after=None)
            yield chunk({"content": turn.text[start : min(start + turn.chunk, end)]})
        if turn.fail_after is not None:
            if turn.failure == "disconnect":
                raise DroppedConnection("scripted: connection dropped mid-stream")
            error = {"message": "scripted failure mid-stream", "type": "server_error", "code": 500}
            yield f"data: {json.dumps({'error': error})}\n\n".encode()
            return
        yield chunk({}, finish="stop")
    else:
        for i, (name, args) in enumerate(turn.calls):
            call = _tool_call(i, name, args)
            arguments = call["function"]["arguments"]
            call["function"]["arguments"] = ""
            yield chunk({"tool_calls": [call]})
            for start in range(0, len(arguments), turn.arg_chunk):
                piece = arguments[start : start + turn.arg_chunk]
                yield chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        yield chunk({}, finish="tool_calls")
    if not include_usage or (isinstance(turn, Text) and not turn.usage):
        yield b"data: [DONE]\n\n"
        return
    final = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": _USAGE,
    }
    yield f"data: {json.dumps(final)}\n\n".encode()
    yield b"data: [DONE]\n\n"
