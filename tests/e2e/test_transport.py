"""The WebSocket contract: authentication, handshake, heartbeat, limits and every bad input."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import SpawnServer
from tests.fakes.llm_server import FakeLLM, Text
from tests.harness import JWT_SECRET, TERMINAL, ServerProcess, make_token, unique_user


async def rejected(server: ServerProcess, **connect: Any) -> tuple[list[dict[str, Any]], int]:
    """Connect, collect every frame until the server closes; return (frames, close code)."""
    frames: list[dict[str, Any]] = []
    async with websockets.connect(server.ws_url, **connect) as ws:

        async def read_forever() -> None:
            while True:
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))

        with pytest.raises(ConnectionClosed) as closed:
            await read_forever()
    assert closed.value.rcvd is not None
    return frames, closed.value.rcvd.code


def _unsigned(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


BAD_TOKENS = {
    "alg_none": _unsigned({"sub": "mallory", "exp": int(time.time()) + 600}),
    "wrong_key": make_token("mallory", secret="another-secret-" + "y" * 60),
    "expired": make_token("mallory", ttl=-60),
    "missing_sub": make_token(None),  # type: ignore[arg-type]
    "missing_exp": jwt.encode({"sub": "mallory"}, JWT_SECRET, "HS256"),
    "empty_sub": make_token(""),
    "garbage": "not-a-jwt",
    "hs512": jwt.encode(
        {"sub": "mallory", "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS512"
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
async def test_bad_token_gets_one_unauthorized_error_and_close_4401(
    server: ServerProcess, name: str
) -> None:
    headers = {"Authorization": f"Bearer {BAD_TOKENS[name]}"}
    frames, code = await rejected(server, additional_headers=headers)
    assert code == 4401
    assert len(frames) == 1
    assert frames[0]["type"] == "error"
    assert frames[0]["code"] == "unauthorized"


async def test_missing_token_is_rejected(server: ServerProcess) -> None:
    frames, code = await rejected(server)
    assert code == 4401
    assert [f["code"] for f in frames] == ["unauthorized"]


async def test_header_auth_sends_system_message_first(server: ServerProcess) -> None:
    user = unique_user()
    async with server.connect(user) as client:
        hello = client.hello
    assert hello["user_id"] == user
    assert hello["protocol"] == "parley.v1"
    assert hello["heartbeat_interval_s"] == 25
    assert hello["connection_id"]
    assert hello["server_version"]
    assert hello["model"] == "openai:fake-model"


async def test_subprotocol_auth_selects_parley_v1(server: ServerProcess) -> None:
    user = unique_user()
    protocols = ["parley.v1", f"bearer.{make_token(user)}"]
    async with websockets.connect(server.ws_url, subprotocols=protocols) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "parley.v1"
        hello = json.loads(await ws.recv())
    assert hello["type"] == "system_message"
    assert hello["user_id"] == user


async def test_subprotocol_with_a_bad_token_is_rejected(server: ServerProcess) -> None:
    protocols = ["parley.v1", "bearer.abc.def.ghi"]
    frames, code = await rejected(server, subprotocols=protocols)
    assert code == 4401
    assert [f["code"] for f in frames] == ["unauthorized"]


async def test_origin_not_in_allowed_list_is_closed_4403(spawn: SpawnServer) -> None:
    server = spawn(ALLOWED_ORIGINS="https://chat.example.com, https://app.example.com")
    headers = {"Authorization": f"Bearer {make_token(unique_user())}"}
    frames, code = await rejected(server, additional_headers=headers, origin="https://evil.example")
    assert code == 4403
    assert frames == []
    async with websockets.connect(
        server.ws_url, additional_headers=headers, origin="https://app.example.com"
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "system_message"


async def test_too_many_connections_for_one_user_is_closed_4429(spawn: SpawnServer) -> None:
    server = spawn(MAX_CONNECTIONS_PER_USER="2")
    user = unique_user()
    async with server.connect(user), server.connect(user):
        headers = {"Authorization": f"Bearer {make_token(user)}"}
        frames, code = await rejected(server, additional_headers=headers)
        async with server.connect(unique_user()) as someone_else:
            assert someone_else.hello["type"] == "system_message"
    assert code == 4429
    assert frames == []


async def test_client_ping_is_answered_with_pong_and_a_client_pong_with_nothing(
    server: ServerProcess,
) -> None:
    async with server.connect(unique_user()) as client:
        await client.send({"type": "ping"})
        await client.recv()
        await client.send({"type": "pong"})
        await client.send({"type": "ping"})
        await client.recv()
    assert [f["type"] for f in client.frames] == ["system_message", "pong", "pong"]


async def test_server_pings_and_closes_a_silent_client_with_4408(spawn: SpawnServer) -> None:
    server = spawn(WEBSOCKET_HEARTBEAT_INTERVAL="0.5")
    headers = {"Authorization": f"Bearer {make_token(unique_user())}"}
    started = time.monotonic()
    frames, code = await rejected(server, additional_headers=headers)
    elapsed = time.monotonic() - started
    assert code == 4408
    assert [f["type"] for f in frames[:2]] == ["system_message", "ping"]
    assert {f["type"] for f in frames[1:]} == {"ping"}
    # Two silent intervals (1 s) at least; the upper bound only says "not never".
    assert 1.0 <= elapsed < 8.0


async def test_a_client_answering_pings_stays_connected(spawn: SpawnServer) -> None:
    server = spawn(WEBSOCKET_HEARTBEAT_INTERVAL="0.3")
    async with server.connect(unique_user()) as client:
        # Longer than the two silent intervals after which a client is closed; `recv` answers
        # every server ping with a pong and sends nothing else.
        deadline = time.monotonic() + 1.5
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                pytest.fail(f"unexpected frame {await client.recv(timeout=left)}")
        await client.send({"type": "ping"})
        pong = await client.recv()
    assert pong["type"] == "pong"
    kinds = [f["type"] for f in client.frames]
    assert kinds[0] == "system_message"
    assert kinds[-1] == "pong"
    assert set(kinds[1:-1]) == {"ping"}
    assert len(kinds[1:-1]) >= 3


BAD_FRAMES = [
    ("{not json", "invalid_json", None),
    ("[1, 2]", "invalid_message", None),
    ('"just a string"', "invalid_message", None),
    ("{}", "invalid_message", "type"),
    ('{"type": 5}', "invalid_message", "type"),
    ('{"type": "launch_missiles"}', "unknown_type", "launch_missiles"),
    ('{"type": "user_message"}', "invalid_message", "content"),
    ('{"type": "user_message", "content": ""}', "invalid_message", "content"),
    ('{"type": "user_message", "content": 42}', "invalid_message", "content"),
    ('{"type": "user_message", "content": "hi", "thread_id": 7}', "invalid_message", "thread_id"),
    (
        '{"type": "user_message", "content": "hi", "client_message_id": ""}',
        "invalid_message",
        "client_message_id",
    ),
    ('{"type": "stop_agent"}', "invalid_message", "run_id"),
    ('{"type": "resume", "thread_id": "t"}', "invalid_message", "after_seq"),
    ('{"type": "resume", "thread_id": "t", "after_seq": -1}', "invalid_message", "after_seq"),
    ('{"type": "resume", "thread_id": "t", "after_seq": "3"}', "invalid_message", "after_seq"),
    ('{"type": "resume", "thread_id": "t", "after_seq": 1.5}', "invalid_message", "after_seq"),
    ('{"type": "resume", "thread_id": "t", "after_seq": true}', "invalid_message", "after_seq"),
]


@pytest.mark.parametrize(("frame", "code", "field"), BAD_FRAMES)
async def test_malformed_message_gets_an_error_naming_the_field_and_stays_open(
    server: ServerProcess, frame: str, code: str, field: str | None
) -> None:
    async with server.connect(unique_user()) as client:
        await client.send(frame)
        error = await client.recv()
        await client.send({"type": "ping"})
        pong = await client.recv()
    assert [f["type"] for f in client.frames] == ["system_message", "error", "pong"]
    assert error["type"] == "error"
    assert error["code"] == code
    if field is not None:
        assert field in error["message"]
    assert pong["type"] == "pong"


async def test_content_over_32000_characters_is_invalid(server: ServerProcess) -> None:
    async with server.connect(unique_user()) as client:
        error = await client.ask("a" * 32001)
        ok = await client.ask("a" * 32000)
    assert error["code"] == "invalid_message"
    assert "content" in error["message"]
    assert ok["type"] == "message_accepted"


async def test_binary_frame_is_invalid_and_the_connection_stays_open(server: ServerProcess) -> None:
    async with server.connect(unique_user()) as client:
        await client.ws.send(b"\x00\x01binary")
        error = await client.recv()
        await client.send({"type": "ping"})
        assert (await client.recv())["type"] == "pong"
    assert error["code"] == "invalid_message"


async def test_oversized_frame_gets_message_too_large_and_close_1009(spawn: SpawnServer) -> None:
    server = spawn(MAX_MESSAGE_BYTES="4096")
    async with server.connect(unique_user()) as client:
        await client.send({"type": "user_message", "content": "é" * 3000})  # 6000 bytes
        error = await client.recv()
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
    assert error["code"] == "message_too_large"
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009
    # Beyond four times the cap (and at least 1 MiB) the WebSocket layer refuses the frame
    # itself: close 1009 and no error frame.
    async with server.connect(unique_user()) as client:
        await client.send({"type": "user_message", "content": "a" * ((1 << 20) + 1)})
        with pytest.raises(ConnectionClosed) as huge:
            await client.recv()
    assert huge.value.rcvd is not None
    assert huge.value.rcvd.code == 1009
    assert [f["type"] for f in client.frames] == ["system_message"]


async def test_plain_http_to_the_websocket_path_is_refused(server: ServerProcess) -> None:
    with pytest.raises(InvalidStatus):
        async with websockets.connect(server.ws_url.replace("/ws", "/nope")):
            pass


async def test_messages_from_a_flood_of_clients_each_get_answers(server: ServerProcess) -> None:
    async def one() -> str:
        async with server.connect(unique_user()) as client:
            accepted = await client.ask("ping the agent")
            events = await client.run_events(accepted["run_id"])
            return str(events[-1]["type"])

    outcomes = await asyncio.gather(*(one() for _ in range(20)))
    assert outcomes == ["agent_completed"] * 20


class RawSlowClient:
    """A WebSocket client on a bare socket with a tiny receive buffer that sends one message
    and then stops reading, like a stalled phone. (Client libraries keep draining the socket
    in the background, which would hide the stall.)"""

    def __init__(self, port: int, token: str) -> None:
        # A small receive buffer, set before connecting so the TCP window stays small; not so
        # small that reading it later crawls on delayed acknowledgements.
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
        self.data = bytearray()
        while b"\r\n\r\n" not in self.data:  # the 101 response, before any frame is sent
            self.data += self.sock.recv(4096)
        assert self.data.startswith(b"HTTP/1.1 101"), bytes(self.data[:100])

    def send(self, message: dict[str, Any]) -> None:
        payload, mask = json.dumps(message).encode(), os.urandom(4)
        assert len(payload) < 126
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def close_code(self) -> int:
        """Read on until the server's close frame arrives; its code."""
        self.sock.settimeout(30)
        while True:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return -1
            self.data += chunk
            if (code := _close_frame_code(self.data)) is not None:
                return code


def _close_frame_code(data: bytearray) -> int | None:
    body = memoryview(data)[data.index(b"\r\n\r\n") + 4 :]
    while len(body) >= 2:
        opcode, length, offset = body[0] & 0x0F, body[1] & 0x7F, 2
        if length == 126:
            length, offset = int.from_bytes(body[2:4], "big"), 4
        elif length == 127:
            length, offset = int.from_bytes(body[2:10], "big"), 10
        if len(body) < offset + length:
            return None  # the rest has not arrived yet
        if opcode == 0x8:
            return int.from_bytes(body[offset : offset + 2], "big")
        body = body[offset + length :]
    return None


TCP_WMEM = "/proc/sys/net/ipv4/tcp_wmem"


def _kernel_send_buffer_max() -> int:
    """The most a TCP send buffer may autotune to on this machine (tcp_wmem's maximum)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(TCP_WMEM) as f:
        return int(f.read().split()[2])
    return 4 << 20


async def test_a_client_that_stops_reading_is_closed_1013_and_never_stalls_others(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(SEND_QUEUE_SIZE="8")
    # More than the server's send buffer (autotuned up to tcp_wmem's maximum) plus the slow
    # client's fixed 64 KiB receive buffer can absorb, whatever this kernel's settings are.
    size = 2 * _kernel_send_buffer_max() + 1_000_000
    chunk = 50_000
    # Streamed over a few seconds, so that the other user's run overlaps it.
    flood = fake_llm.script(f"T{uuid.uuid4().hex[:8]}", Text("x" * size, chunk=chunk, delay_s=0.02))
    slow_user = unique_user("slow")
    slow = await asyncio.to_thread(RawSlowClient, server.port, make_token(slow_user))
    slow.send({"type": "user_message", "content": f"flood me {flood}"})
    headers = {"Authorization": f"Bearer {make_token(slow_user)}"}
    async with httpx.AsyncClient(base_url=server.http, headers=headers) as http:
        # Wait until the flood is under way (its first deltas are stored).
        for _ in range(100):
            threads = (await http.get("/api/threads")).json()["threads"]
            if threads and threads[0]["last_seq"] >= 5:
                break
            await asyncio.sleep(0.05)
        thread_id = threads[0]["id"]
        async with server.connect(unique_user("fast")) as fast:
            asked = time.monotonic()
            started = await fast.ask("are you still answering others?")
            events = await fast.run_events(started["run_id"], timeout=10)
            took = time.monotonic() - asked
        flood_so_far = (await http.get(f"/api/threads/{thread_id}/events")).json()["events"]
    assert events[-1]["type"] == "agent_completed"
    # The overlap: the flood was still going when the other user's run had finished ...
    assert not any(e["type"] in TERMINAL for e in flood_so_far), "the flood ended first"
    # ... and that run was not held up behind it (it takes well under a second alone).
    assert took < 5
    async with httpx.AsyncClient(base_url=server.http) as http:
        for _ in range(300):
            metrics = (await http.get("/metrics")).text
            if "parley_send_queue_overflows_total 1.0" in metrics:
                break
            await asyncio.sleep(0.1)
    assert "parley_send_queue_overflows_total 1.0" in metrics
    assert await asyncio.to_thread(slow.close_code) == 1013
    # Nothing was lost: once the run is over, the slow user reconnects, resumes and gets it
    # all. (Resuming while it still streams is the next test.)
    async with httpx.AsyncClient(base_url=server.http, headers=headers) as http:
        for _ in range(300):
            log = (await http.get(f"/api/threads/{thread_id}/events")).json()["events"]
            if log and log[-1]["type"] in TERMINAL:
                break
            await asyncio.sleep(0.1)
    async with server.connect(slow_user, max_size=None) as again:
        replayed = await again.replay(thread_id)
    text = "".join(f["text"] for f in replayed if f["type"] == "agent_message_delta")
    assert text == "x" * size
    assert replayed[-1]["type"] == "agent_completed"


_KEYS: dict[str, Any] = {}


def _signing_keys() -> dict[str, Any]:
    """An RSA and an EC P-256 key (generated once per test process) and a stranger's RSA key."""
    if not _KEYS:
        _KEYS.update(
            rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ec=ec.generate_private_key(ec.SECP256R1()),
            stranger=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        )
    return _KEYS


@contextlib.contextmanager
def jwks_server(jwks: dict[str, Any]) -> Iterator[str]:
    """An auth service on loopback publishing `jwks` at /.well-known/jwks.json; its URL."""
    body = json.dumps(jwks).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == "/.well-known/jwks.json"
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body if found else b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    service = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=service.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{service.server_address[1]}"
    finally:
        service.shutdown()
        service.server_close()


def _jwk(public_key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
    jwk = json.loads(algorithm.to_jwk(public_key))
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


async def test_rs256_and_es256_tokens_are_checked_against_the_jwks_with_issuer_and_audience(
    spawn: SpawnServer,
) -> None:
    keys = _signing_keys()
    jwks = {
        "keys": [
            _jwk(keys["rsa"].public_key(), "rsa-1", "RS256"),
            _jwk(keys["ec"].public_key(), "ec-1", "ES256"),
        ]
    }

    def token(key: str, kid: str, alg: str, **claims: Any) -> str:
        payload = {"sub": "jwks-user", "exp": int(time.time()) + 600}
        payload.update({"iss": "https://auth.example", "aud": "parley", **claims})
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, keys[key], algorithm=alg, headers={"kid": kid})

    with jwks_server(jwks) as auth_url:
        server = spawn(
            JWT_SECRET="",
            AUTH_SERVICE_URL=auth_url,
            JWT_ISSUER="https://auth.example",
            JWT_AUDIENCE="parley",
        )
        accepted = {}
        for name, good in {
            "rs256": token("rsa", "rsa-1", "RS256"),
            "es256": token("ec", "ec-1", "ES256"),
        }.items():
            headers = {"Authorization": f"Bearer {good}"}
            async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
                accepted[name] = json.loads(await ws.recv())
        refused = {}
        for name, bad in {
            "wrong_issuer": token("rsa", "rsa-1", "RS256", iss="https://evil.example"),
            "wrong_audience": token("ec", "ec-1", "ES256", aud="someone-else"),
            "no_audience": token("rsa", "rsa-1", "RS256", aud=None),
            "unknown_signer": token("stranger", "rsa-1", "RS256"),
            "hs256_with_a_public_key_id": jwt.encode(
                {"sub": "x", "exp": int(time.time()) + 600, "iss": "https://auth.example"},
                "a" * 40,
                algorithm="HS256",
                headers={"kid": "rsa-1"},
            ),
        }.items():
            headers = {"Authorization": f"Bearer {bad}"}
            refused[name] = await rejected(server, additional_headers=headers)
    for hello in accepted.values():
        assert hello["type"] == "system_message"
        assert hello["user_id"] == "jwks-user"
    for name, (frames, code) in refused.items():
        assert code == 4401, name
        assert [f["code"] for f in frames] == ["unauthorized"], name


async def test_a_fast_reader_resuming_a_busy_run_is_not_closed_1013(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(SEND_QUEUE_SIZE="8")
    user = unique_user()
    history = fake_llm.script(f"T{uuid.uuid4().hex[:8]}", Text("h" * 3000, chunk=1))
    # Streams for several seconds, so that live events arrive while the replay is read.
    busy = fake_llm.script(f"T{uuid.uuid4().hex[:8]}", Text("b" * 6000, chunk=3, delay_s=0.003))
    async with server.connect(user, max_size=None) as first:
        earlier = await first.ask(f"a long history {history}")
        await first.run_events(earlier["run_id"], timeout=60)
        accepted = await first.ask(f"stream fast {busy}", thread_id=earlier["thread_id"])
        while len(first.events_of(accepted["run_id"])) < 10:
            await first.recv()
    # A reader that keeps up reconnects mid-run and resumes the thread from the start.
    async with server.connect(user, max_size=None) as again:
        await again.send({"type": "resume", "thread_id": accepted["thread_id"], "after_seq": 0})
        events = await again.run_events(accepted["run_id"], timeout=60)
    assert events[-1]["type"] == "agent_completed"
    text = "".join(e["text"] for e in events if e["type"] == "agent_message_delta")
    assert text == "b" * 6000
    # The run was still going when the replay ended: its end came live, after resume_complete.
    complete = next(i for i, f in enumerate(again.frames) if f["type"] == "resume_complete")
    ended = next(i for i, f in enumerate(again.frames) if f is events[-1])
    assert complete < ended, "the run had ended before the replay did: nothing was busy"
