"""ws_protocol.py against uvicorn's real protocol machinery: `write_text` writes a frame only
when uvicorn's own `send` would write it at once, and refuses (so the frame goes through ASGI,
which waits or fails) in every other state; and the HTTP protocol that upgraded a connection
is freed without the cycle collector."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from parley.delivery import WRITE_TEXT_EXTENSION
from parley.ws_protocol import HttpProtocol, WebSocketProtocol

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
# A client's close frame (1000), masked as a client's frames are.
CLIENT_CLOSE = b"\x88\x82" + b"\x00\x00\x00\x00" + b"\x03\xe8"


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol


async def test_frames_are_written_only_when_uvicorn_would_write_them_at_once() -> None:
    accepted = asyncio.Event()
    finish = asyncio.Event()
    scopes: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scopes.append(scope)
        await receive()  # websocket.connect
        write = scope["extensions"][WRITE_TEXT_EXTENSION]
        assert not write("before the handshake")
        await send({"type": "websocket.accept"})
        accepted.set()
        await finish.wait()

    config = Config(app=app, ws=WebSocketProtocol, ws_ping_interval=None, log_config=None)
    config.load()
    protocol = WebSocketProtocol(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)
    protocol.data_received(HANDSHAKE)
    await asyncio.wait_for(accepted.wait(), 5)
    write = scopes[0]["extensions"][WRITE_TEXT_EXTENSION]
    assert transport.written.startswith(b"HTTP/1.1 101")

    transport.written.clear()
    assert write("hi")
    assert bytes(transport.written) == b"\x81\x02hi"  # one unmasked text frame

    protocol.pause_writing()  # the client stopped reading: its buffer is full
    assert not write("later")
    protocol.resume_writing()
    assert write("later")

    protocol.data_received(CLIENT_CLOSE)  # the client closes: nothing more is written
    transport.written.clear()
    assert not write("after the close")
    assert transport.written == b""

    finish.set()
    for task in list(protocol.tasks):
        await task
    # Once the app is done the scope no longer holds the protocol.
    assert WRITE_TEXT_EXTENSION not in scopes[0]["extensions"]


@pytest.mark.parametrize("served_before", [False, True], ids=["fresh", "kept_alive"])
async def test_the_http_protocol_that_upgraded_a_connection_is_freed_without_the_collector(
    served_before: bool,
) -> None:
    accepted = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        accepted.set()
        await receive()  # websocket.disconnect

    config = Config(
        app=app, http=HttpProtocol, ws=WebSocketProtocol, ws_ping_interval=None, log_config=None
    )
    config.load()
    transport = Transport()
    state = ServerState()
    http = HttpProtocol(config=config, server_state=state, app_state={})
    http.connection_made(transport)
    gc.disable()
    try:
        if served_before:  # a plain request first, on the same connection
            http.data_received(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
            while state.tasks:
                await asyncio.gather(*state.tasks)
            assert transport.written.startswith(b"HTTP/1.1 200")
        http.data_received(HANDSHAKE)
        websocket = transport.get_protocol()
        assert isinstance(websocket, WebSocketProtocol)
        upgraded = weakref.ref(http)
        del http
        assert upgraded() is None  # freed at once: no cycle through its parser
        await asyncio.wait_for(accepted.wait(), 5)
        websocket.data_received(CLIENT_CLOSE)
        for task in list(websocket.tasks):
            await task
    finally:
        gc.enable()
