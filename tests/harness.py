"""Test harness: a real `parley serve` process on a free loopback port, and a WebSocket client.

The server runs as a subprocess with its own data directory and the scripted LLM server as its
provider. Its environment is built from scratch (only PATH-like basics are inherited), so no
real model key or endpoint on the developer's machine can ever be used by the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import websockets
from websockets.asyncio.client import ClientConnection

JWT_SECRET = "test-secret-" + "x" * 60
TERMINAL = {"agent_completed", "agent_error", "agent_cancelled"}
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "SYSTEMROOT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_token(user: str, *, secret: str = JWT_SECRET, ttl: int = 3600, **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": user, "iat": now, "exp": now + ttl}
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, "HS256")


def unique_user(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def base_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env.update(
        ENVIRONMENT="test",
        DATA_DIR=str(data_dir),
        JWT_SECRET=JWT_SECRET,
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        STARTUP_TIMEOUT_S="10",
    )
    env.update(overrides)
    return env


def parley_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "parley", *args]


@dataclass
class ServerProcess:
    env: dict[str, str]
    port: int
    proc: subprocess.Popen[str] | None = None
    log_path: Path | None = None
    output: str = ""
    exit_code: int | None = None
    _log_file: Any = field(default=None, repr=False)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0) -> ServerProcess:
        self.log_path = Path(self.env["DATA_DIR"]) / f"server-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            parley_command("serve"),
            env={**self.env, "PORT": str(self.port), "HOST": "127.0.0.1"},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        if wait_ready:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()  # a fixture that fails here never reaches its teardown
                raise
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.read_log()}")
            try:
                if httpx.get(self.http + "/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        if self.proc is None:
            return self.exit_code or 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode
        if self._log_file is not None:
            self._log_file.close()
        self.output = self.read_log()
        return self.exit_code

    def token(self, user: str) -> str:
        return make_token(user)

    @contextlib.asynccontextmanager
    async def connect(self, user: str, **kwargs: Any) -> AsyncIterator[Client]:
        headers = {"Authorization": f"Bearer {make_token(user)}"}
        async with websockets.connect(self.ws_url, additional_headers=headers, **kwargs) as ws:
            client = Client(ws)
            hello = await client.recv()
            assert hello["type"] == "system_message", hello
            client.hello = hello
            yield client


class Client:
    """A test client: JSON in and out, with helpers to read until an event arrives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send(message if isinstance(message, str) else json.dumps(message))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
            frame = json.loads(raw)
            if frame["type"] == "ping":
                await self.send({"type": "pong"})
                continue
            return dict(frame)

    async def recv_type(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            frame = await self.recv(timeout)
            if frame["type"] == kind:
                return frame

    async def ask(self, content: str, **fields: Any) -> dict[str, Any]:
        """Send a user_message and return its message_accepted (or the error)."""
        await self.send({"type": "user_message", "content": content, **fields})
        while True:
            frame = await self.recv()
            if frame["type"] in ("message_accepted", "error"):
                return frame

    async def run_events(self, run_id: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Every event of `run_id` up to and including its terminal event."""
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            frame = await self.recv(max(0.1, deadline - time.monotonic()))
            if frame.get("run_id") == run_id and "seq" in frame:
                events.append(frame)
                if frame["type"] in TERMINAL:
                    return events


class CuttingProxy:
    """Forwards loopback TCP to Parley; `cut()` closes every connection it carries."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )
        self._writers.update({writer, upstream_writer})
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
        self._writers.discard(writer)
