"""The benchmark's scripted model: an OpenAI-compatible chat-completions server in its own process.

    python -m bench.model_server [--port 0]     # prints "listening on <port>" once bound

The pace is asked for in the request, so one server serves Parley and the peer alike: a user
message containing `[stream 40x25ms]` is answered with 40 tokens, the i-th sent 25·i ms after
the request arrived (deadlines from the request's start, so a loaded event loop does not
stretch the ideal run). Without the marker the answer is 4 tokens at once. Token i reads
`tok<i> `, so a client can check the whole answer (`expected_text`).

It is plain asyncio on uvloop (HTTP/1.1 keep-alive, chunked SSE), not a web framework: it
shares two cores with the servers under test and must stay far from being the bottleneck. The
listen backlog is deep (2048) so hundreds of simultaneous connects are never dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
import uuid
from typing import Any

import uvloop

from parley.gc_settings import tune_for_serving

BACKLOG = 2048
MARKER = re.compile(r"\[stream (\d+)x(\d+)ms\]")
PLAIN_TOKENS = 4
_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def stream_marker(tokens: int, delay_ms: int) -> str:
    return f"[stream {tokens}x{delay_ms}ms]"


def expected_text(tokens: int) -> str:
    return "".join(f"tok{i} " for i in range(tokens))


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content)
    return ""


def _pace(body: dict[str, Any]) -> tuple[int, float]:
    found = MARKER.search(_last_user_text(body))
    if found is None:
        return PLAIN_TOKENS, 0.0
    return int(found.group(1)), int(found.group(2)) / 1000


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _json(payload: Any, status: str = "200 OK") -> bytes:
    return _response(status, "application/json", json.dumps(payload).encode())


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Stream:
    """One streamed completion: OpenAI `chat.completion.chunk` SSE frames."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.ident = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def frame(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        payload = {
            "id": self.ident,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return _chunked(b"data: %s\n\n" % json.dumps(payload).encode())

    def usage(self) -> bytes:
        payload = {
            "id": self.ident,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": _USAGE,
        }
        return _chunked(b"data: %s\n\n" % json.dumps(payload).encode())


async def _stream(writer: asyncio.StreamWriter, body: dict[str, Any], started: float) -> None:
    tokens, delay = _pace(body)
    stream = _Stream(body.get("model", "bench-model"))
    loop = asyncio.get_running_loop()
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        + stream.frame({"role": "assistant", "content": ""})
    )
    for i in range(tokens):
        if delay:
            await asyncio.sleep(max(0.0, started + (i + 1) * delay - loop.time()))
        writer.write(stream.frame({"content": f"tok{i} "}))
        await writer.drain()
    tail = stream.frame({}, finish="stop")
    if (body.get("stream_options") or {}).get("include_usage"):
        tail += stream.usage()
    writer.write(tail + _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()


def _completion(body: dict[str, Any]) -> dict[str, Any]:
    tokens, _ = _pace(body)
    message = {"role": "assistant", "content": expected_text(tokens)}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "bench-model"),
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": _USAGE,
    }


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return method, path.split("?", 1)[0], body


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    try:
        while (request := await _read_request(reader)) is not None:
            started = loop.time()
            method, path, raw = request
            if method == "GET" and path.endswith("/models"):
                models = {"object": "list", "data": [{"id": "bench-model", "object": "model"}]}
                writer.write(_json(models))
            elif method == "POST" and path.endswith("/chat/completions"):
                body = json.loads(raw)
                if body.get("stream"):
                    await _stream(writer, body, started)
                else:
                    writer.write(_json(_completion(body)))
            else:
                writer.write(_json({"error": {"message": "not found"}}, "404 Not Found"))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port, backlog=BACKLOG)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    # The harness must not stall what it measures: its collector is tuned as the server's is.
    tune_for_serving()
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
