"""Tokens expire on open connections, `authenticate` refreshes them, and a stalled client is
closed with a documented code (issue 14, rows 6 and 7; docs/protocol.md, Connections)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import jwt
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.conftest import SpawnServer
from tests.fakes.llm_server import FakeLLM, Text
from tests.harness import JWT_SECRET, TERMINAL, Client, ServerProcess, make_token, unique_user


def token_until(user: str, exp: int) -> str:
    return jwt.encode({"sub": user, "iat": int(time.time()), "exp": exp}, JWT_SECRET, "HS256")


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@contextlib.asynccontextmanager
async def connect(server: ServerProcess, token: str) -> AsyncIterator[Client]:
    """A recording client on `token` (the harness's own `connect` mints hour-long tokens)."""
    headers = {"Authorization": f"Bearer {token}"}
    async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
        client = Client(ws)
        client.hello = await client.recv()
        assert client.hello["type"] == "system_message", client.hello
        yield client


async def until_closed(client: Client, timeout: float) -> tuple[list[dict[str, Any]], Any, float]:
    """Every frame until the server closes: (frames, the close frame received, time.time())."""
    frames = []
    try:
        while True:
            frames.append(await client.recv(timeout=timeout))
    except ConnectionClosed as closed:
        return frames, closed.rcvd, time.time()


async def still_served(client: Client) -> None:
    await client.send({"type": "ping"})
    assert (await client.recv())["type"] == "pong"


# --------------------------------------------------------------------------- row 7: expiry


async def test_a_connection_is_closed_4401_token_expired_at_its_tokens_exp(
    server: ServerProcess,
) -> None:
    exp = int(time.time()) + 3
    async with connect(server, token_until(unique_user(), exp)) as client:
        assert epoch(client.hello["token_expires_at"]) == exp
        frames, close, closed_at = await until_closed(client, timeout=15)
    assert frames == [
        {"type": "error", "ts": frames[0]["ts"], "code": "unauthorized", "message": "token expired"}
    ]
    assert (close.code, close.reason) == (4401, "token expired")
    # At exp: not before it (the timer runs on the server's clock, which is this machine's);
    # the upper bound only says "not never".
    assert exp - 0.1 <= closed_at < exp + 10


async def test_a_refreshed_connection_outlives_its_first_token_and_keeps_getting_live_events(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    user = unique_user()
    first_exp = int(time.time()) + 3
    # Streams for about five seconds: from before the first token's exp to well after it.
    trigger = fake_llm.script(
        f"R{uuid.uuid4().hex[:8]}", Text("tick " * 100, chunk=5, delay_s=0.05)
    )
    async with connect(server, token_until(user, first_exp)) as client:
        accepted = await client.ask(f"stream across the expiry {trigger}")
        assert accepted["type"] == "message_accepted", accepted
        second_exp = first_exp + 8
        await client.send({"type": "authenticate", "token": token_until(user, second_exp)})
        ack = await client.recv_type("authenticated")
        assert ack["user_id"] == user
        assert epoch(ack["token_expires_at"]) == second_exp
        events = await client.run_events(accepted["run_id"], timeout=20)
        assert events[-1]["type"] == "agent_completed"
        assert time.time() > first_exp + 1
        late = [e for e in events if epoch(e["ts"]) > first_exp + 0.5]
        assert any(e["type"] == "agent_message_delta" for e in late), "no live event after exp"
        await still_served(client)
        # The new token expires in its turn.
        frames, close, closed_at = await until_closed(client, timeout=15)
    assert [(f["type"], f.get("message")) for f in frames] == [("error", "token expired")]
    assert (close.code, close.reason) == (4401, "token expired")
    assert second_exp - 0.1 <= closed_at < second_exp + 10
    client.check_runs()


def _unsigned(user: str, exp: int) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({'sub': user, 'exp': exp})}."


REFUSED_REFRESHES = {
    # name: (the token, given the user and a later exp; what the error message says)
    "another_user": (
        lambda user, exp: token_until("someone-else-" + user, exp),
        "it is for another user ('sub' differs)",
    ),
    "expired": (lambda user, exp: token_until(user, int(time.time()) - 60), "token expired"),
    "wrong_key": (
        lambda user, exp: make_token(user, secret="another-secret-" + "y" * 60),
        "invalid token: Signature verification failed",
    ),
    "alg_none": (_unsigned, "token algorithm 'none' is not allowed"),
    "not_a_jwt": (lambda user, exp: "not-a-jwt", "malformed token"),
}


@pytest.mark.parametrize("name", sorted(REFUSED_REFRESHES))
async def test_a_refused_refresh_is_an_error_and_the_connection_keeps_its_token(
    server: ServerProcess, name: str, fake_llm: FakeLLM
) -> None:
    make, says = REFUSED_REFRESHES[name]
    user = unique_user()
    exp = int(time.time()) + 4
    trigger = fake_llm.script(f"K{uuid.uuid4().hex[:8]}", Text("still mine"))
    async with connect(server, token_until(user, exp)) as client:
        await client.send({"type": "authenticate", "token": make(user, exp + 3600)})
        error = await client.recv()
        assert (error["type"], error["code"]) == ("error", "unauthorized"), error
        assert error["message"].startswith(f"token refused: {says}"), error
        assert "the connection keeps its current token" in error["message"], error
        # Nothing lost: the connection serves its user as before ...
        accepted = await client.ask(f"whose message is this? {trigger}")
        assert accepted["type"] == "message_accepted", accepted
        events = await client.run_events(accepted["run_id"])
        assert events[-1]["content"] == "still mine"
        # ... and still ends at the old token's exp.
        frames, close, closed_at = await until_closed(client, timeout=15)
    assert [(f["type"], f.get("message")) for f in frames] == [("error", "token expired")]
    assert (close.code, close.reason) == (4401, "token expired")
    assert exp - 0.1 <= closed_at < exp + 10
    headers = {"Authorization": f"Bearer {make_token(user)}"}
    async with httpx.AsyncClient(base_url=server.http, headers=headers) as http:
        threads = (await http.get("/api/threads")).json()["threads"]
    assert [t["id"] for t in threads] == [accepted["thread_id"]]


MALFORMED_AUTHENTICATE: dict[str, Any] = {
    "missing": {},
    "null": {"token": None},
    "number": {"token": 42},
    "empty": {"token": ""},
    "space": {"token": "abc def.ghi"},
    "nul": {"token": "abc\u0000def"},
    "lone_surrogate": '{"type": "authenticate", "token": "abc\\ud800def"}',
    "non_ascii": {"token": "abcé.def.ghi"},
    "too_long": {"token": "a" * 16385},
}


@pytest.mark.parametrize("name", sorted(MALFORMED_AUTHENTICATE))
async def test_a_malformed_authenticate_is_invalid_message_naming_the_token(
    server: ServerProcess, name: str
) -> None:
    malformed = MALFORMED_AUTHENTICATE[name]
    frame = malformed if isinstance(malformed, str) else {"type": "authenticate", **malformed}
    async with server.connect(unique_user()) as client:
        await (client.ws.send(frame) if isinstance(frame, str) else client.send(frame))
        error = await client.recv()
        assert (error["type"], error["code"]) == ("error", "invalid_message"), error
        assert "field 'token'" in error["message"], error
        await still_served(client)


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


@pytest.mark.parametrize("sub", ["nul\u0000inside", "lone\ud800surrogate", "x" * 256])
async def test_a_token_whose_sub_cannot_be_stored_is_refused_at_the_handshake(
    server: ServerProcess, sub: str
) -> None:
    token = token_until(sub, int(time.time()) + 600)
    headers = {"Authorization": f"Bearer {token}"}
    async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
        frames, close = await _all_until_closed(ws)
    assert [(f["type"], f["code"]) for f in frames] == [("error", "unauthorized")], frames
    assert frames[0]["message"].startswith("token 'sub' must "), frames
    assert close is not None
    assert close.code == 4401


async def _all_until_closed(
    ws: ClientConnection, timeout: float = 10
) -> tuple[list[dict[str, Any]], Any]:
    """The frames until the server closes (or nothing comes for `timeout`), and its close."""
    frames = []
    try:
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    except ConnectionClosed as closed:
        return frames, closed.rcvd
    except TimeoutError:
        return frames, None


async def test_a_client_that_never_reads_again_does_not_keep_its_place(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    # One connection per user: while the stalled one is held, the user cannot connect again.
    server = spawn(
        WEBSOCKET_HEARTBEAT_INTERVAL="1", MAX_CONNECTIONS_PER_USER="1", SEND_QUEUE_SIZE="100000"
    )
    size = 2 * _kernel_send_buffer_max() + 1_000_000  # more than every buffer on the way holds
    trigger = fake_llm.script(f"N{uuid.uuid4().hex[:8]}", Text("z" * size, chunk=50_000))
    user = unique_user("gone")
    stalled = await asyncio.to_thread(StalledClient, server.port, make_token(user))
    stalled.send({"type": "user_message", "content": f"a long answer {trigger}"})
    # 4408 after two silent seconds; its close frame waits behind megabytes never read, and
    # is given up on after one more interval. The bound only says "not never".
    headers = {"Authorization": f"Bearer {make_token(user)}"}
    deadline = time.monotonic() + 30
    while True:
        async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
            frames, close = await _all_until_closed(ws, timeout=1.5)
        if frames and frames[0]["type"] == "system_message":
            break
        assert close is not None
        assert close.code == 4429, close
        assert time.monotonic() < deadline, "the stalled connection kept its place"
        await asyncio.sleep(0.5)
    stalled.sock.close()
