"""A client that stops reading is closed with a documented code (issue 14, row 6;
docs/protocol.md, Connections)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import SpawnServer
from tests.fakes.llm_server import FakeLLM, Text
from tests.harness import TERMINAL, make_token, unique_user


# --------------------------------------------------------------------------- row 6: stalls


class StalledClient:
    """A WebSocket client on a bare socket with a small receive buffer that sends a few
    messages and then reads nothing, like a stalled phone (client libraries keep draining the
    socket in the background, which would hide the stall)."""

    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)  # byte by byte: leave every frame in the socket
        assert head.startswith(b"HTTP/1.1 101"), head[:100]

    def send(self, message: dict[str, Any]) -> None:
        payload, mask = json.dumps(message).encode(), os.urandom(4)
        assert len(payload) < 126
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def read_until_close(self, timeout: float) -> tuple[int, str]:
        """Read on until the server's close frame: its (code, reason); (-1, "") at EOF."""
        self.sock.settimeout(timeout)
        buffer = bytearray()
        while True:
            while len(buffer) >= 2:
                opcode, length, offset = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
                if length == 126:
                    length, offset = int.from_bytes(buffer[2:4], "big"), 4
                elif length == 127:
                    length, offset = int.from_bytes(buffer[2:10], "big"), 10
                if len(buffer) < offset + length:
                    break
                if opcode == 0x8:
                    body = bytes(buffer[offset : offset + length])
                    return int.from_bytes(body[:2], "big"), body[2:].decode()
                del buffer[: offset + length]
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return -1, ""
            buffer += chunk


def _kernel_send_buffer_max() -> int:
    with (
        contextlib.suppress(OSError, ValueError, IndexError),
        open("/proc/sys/net/ipv4/tcp_wmem") as f,
    ):
        return int(f.read().split()[2])
    return 4 << 20


@pytest.mark.timeout(150)
async def test_a_client_that_stops_reading_while_two_answers_stream_is_closed_4408(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    # Default heartbeat (25 s): a client silent for two intervals is closed 4408 after 50 s,
    # later than any protocol-level keepalive of the WebSocket library would have (uvicorn's
    # pings every 20 s, closing 1011 when one goes unanswered for 20 s). The queue is larger
    # than the answers' frames, so the 1013 of an overflowing queue does not decide either.
    server = spawn(SEND_QUEUE_SIZE="100000")
    # Together more than the kernel's send and receive buffers hold, so that the server's
    # writes stall and the close waits behind unread frames; streamed over some 42 seconds.
    size = _kernel_send_buffer_max() + 1_000_000
    chunk = 10_000
    delay = 42 / (size / chunk)
    user = unique_user("stalled")
    stalled = await asyncio.to_thread(StalledClient, server.port, make_token(user))
    started = time.monotonic()
    for _ in range(2):
        trigger = fake_llm.script(f"S{uuid.uuid4().hex[:8]}", Text("y" * size, chunk, delay))
        stalled.send({"type": "user_message", "content": f"a long answer {trigger}"})
    await asyncio.sleep(max(0.0, started + 53 - time.monotonic()))  # past the 4408 deadline
    code, reason = await asyncio.to_thread(stalled.read_until_close, 30)
    assert (code, reason) == (4408, "heartbeat timeout")
    # The runs were not held up by the client that stopped reading: both ended normally.
    headers = {"Authorization": f"Bearer {make_token(user)}"}
    async with httpx.AsyncClient(base_url=server.http, headers=headers, timeout=30) as http:
        for _ in range(300):
            ends = []
            for thread in (await http.get("/api/threads")).json()["threads"]:
                url = f"/api/threads/{thread['id']}/events"
                events = (await http.get(url)).json()["events"]
                ends += [e["type"] for e in events if e["type"] in TERMINAL]
            if len(ends) == 2:
                break
            await asyncio.sleep(0.1)
    assert ends == ["agent_completed", "agent_completed"]
