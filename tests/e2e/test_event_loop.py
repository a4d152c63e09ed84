"""Nothing blocks Parley's event loop: the real app runs in this process under `blockbuster`,
which fails on any blocking call (file I/O, sleep, sync sockets) made on the loop's thread."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import uvicorn
import websockets
from blockbuster import blockbuster_ctx

from parley.app import create_app
from parley.config import Settings
from parley.startup import start
from parley.ws_protocol import HttpProtocol, WebSocketProtocol
from tests.fakes.llm_server import FakeLLM, Text, ToolCall
from tests.harness import JWT_SECRET, TERMINAL, make_token


async def test_runs_with_tools_never_block_the_event_loop(
    fake_llm: FakeLLM, tmp_path: Path
) -> None:
    settings = Settings(
        environment="test",
        data_dir=tmp_path,
        jwt_secret=JWT_SECRET,
        llm_provider="openai",
        llm_model="fake-model",
        llm_base_url=fake_llm.base_url,
        llm_max_retries=0,
    )
    components, _ = await start(settings)
    # Port 0: the kernel picks a free one as the server binds it (no race with other tests).
    # The protocols `parley serve` uses: frames are written on the hot path.
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(components),
            host="127.0.0.1",
            port=0,
            log_config=None,
            http=HttpProtocol,
            ws=WebSocketProtocol,
        )
    )
    serving = asyncio.create_task(server.serve())
    trigger = f"T{uuid.uuid4().hex[:10]}"
    fake_llm.script(
        trigger,
        ToolCall([("calculator", {"expression": "2 ** 8"}), ("current_time", {"timezone": "UTC"})]),
        ToolCall([("search_history", {"query": "hello"})]),
        Text("done", chunk=2),
    )
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        completed: list[dict[str, object]] = []
        with blockbuster_ctx():
            headers = {"Authorization": f"Bearer {make_token('loop-user')}"}
            async with websockets.connect(
                f"ws://127.0.0.1:{port}/ws", additional_headers=headers
            ) as ws:
                await ws.recv()
                for content in ("hello there", f"use tools {trigger}"):
                    await ws.send(json.dumps({"type": "user_message", "content": content}))
                    # A BlockingError inside Parley surfaces as a failed tool or run, since
                    # both are caught and reported: so every one of them must be clean.
                    while (frame := json.loads(await ws.recv()))["type"] not in TERMINAL:
                        if frame["type"] == "tool_completed":
                            completed.append(frame)
                    assert frame["type"] == "agent_completed", frame
    finally:
        server.should_exit = True
        await serving
        await components.close()
    # Every tool the model called completed cleanly (none failed on a blocking call). The first
    # two run concurrently, so their order is not the point.
    assert sorted((str(f["tool"]), str(f["status"])) for f in completed) == [
        ("calculator", "ok"),
        ("current_time", "ok"),
        ("search_history", "ok"),
    ]
