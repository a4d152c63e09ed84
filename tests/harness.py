"""Test harness: a real `parley serve` process on a free loopback port, and a WebSocket client.

The server runs as a subprocess with its own data directory and the scripted LLM server as its
provider. Its environment is built from scratch (only PATH-like basics are inherited), so no
real model key or endpoint on the developer's machine can ever be used by the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
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


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PRIVATE_PORTS_FROM = 10_000  # below: the usual ports of well-known and registered services
PRIVATE_PORT_BLOCK = 1_000  # ports of each pytest-xdist worker
_private_ports_given: set[int] = set()


class PortTaken(Exception):
    """A server could not bind the port it was given: something else holds it."""


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range of source ports for outgoing connections (inclusive). Where it
    cannot be read (not Linux), IANA's dynamic range, which macOS and Windows use."""
    try:
        low, high = (int(bound) for bound in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 49152, 65535
    return low, high


def _private_port_block() -> list[int]:
    low, high = ephemeral_port_range()
    usable = [port for port in range(PRIVATE_PORTS_FROM, 65536) if not low <= port <= high]
    if not usable:
        raise RuntimeError(f"no port from {PRIVATE_PORTS_FROM} up is outside {low}-{high}")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    number = int(worker) if worker.isdigit() else 0
    block = number % max(1, len(usable) // PRIVATE_PORT_BLOCK)
    return usable[block * PRIVATE_PORT_BLOCK : (block + 1) * PRIVATE_PORT_BLOCK]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def private_port() -> int:
    """A loopback port for a server that must keep it across restarts (a private Redis or
    PostgreSQL a test stops and starts again), so cannot bind port 0 and report it.

    Not a port the kernel picks (binding port 0): those come from the ephemeral range
    (`ephemeral_port_range`), the same the kernel draws source ports of outgoing connections
    from, so while the server is down (before its first start, or during a test's outage) any
    client connection on the machine (another test's, another worker's) may take the port as its
    source port, and the server cannot bind it again. So a port outside that range (from
    `PRIVATE_PORTS_FROM` up, clear of the usual ports of well-known services); from a block of
    `PRIVATE_PORT_BLOCK` ports of its own for each pytest-xdist worker (`PYTEST_XDIST_WORKER`:
    gw0, gw1, ...; 27 blocks with Linux's default range), so two workers never pick the same
    one; not one this process gave out already; and bindable now. Something else on the
    machine (another test session, a service) may still bind it before the server does: start
    the server with `start_on_private_port`, which tries another port then.
    """
    block = _private_port_block()
    if _private_ports_given.issuperset(block):
        _private_ports_given.difference_update(block)
    start = random.randrange(len(block))  # another session on the machine has the same block
    for port in block[start:] + block[:start]:
        if port not in _private_ports_given and _bindable(port):
            _private_ports_given.add(port)
            return port
    raise RuntimeError(f"no port of {block[0]}-{block[-1]} is free")


def start_on_private_port(start: Callable[[int], None], attempts: int = 5) -> int:
    """`start(port)` on a `private_port()`; when it raises `PortTaken` (something bound the
    port since it was picked), again on another, up to `attempts` times. Returns the port."""
    for _ in range(attempts - 1):
        port = private_port()
        with contextlib.suppress(PortTaken):
            start(port)
            return port
    port = private_port()
    start(port)
    return port


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs: it is bound
    (so nothing else can take it) but not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


_LISTENING = re.compile(r"Uvicorn running on http://[^:]+:(\d+)")


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
    if "PYTHONPATH" in overrides and "PYTHONPATH" in env:
        # A test's plugin directory comes first; the inherited path (the Parley under test) stays.
        overrides = {
            **overrides,
            "PYTHONPATH": overrides["PYTHONPATH"] + os.pathsep + env["PYTHONPATH"],
        }
    env.update(overrides)
    return env


def parley_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "parley", *args]


@dataclass
class ServerProcess:
    """`parley serve` in a subprocess. With `port=0` (the default) the server binds a port the
    kernel picks, and `start` reads which one from its log: no race with other processes."""

    env: dict[str, str]
    port: int = 0
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
        try:
            if self.port == 0:
                self.port = self._wait_listening(timeout)
            if wait_ready:
                self.wait_ready(timeout)
        except BaseException:
            self.stop()  # a fixture that fails here never reaches its teardown
            raise
        return self

    def _wait_listening(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if found := _LISTENING.search(self.read_log()):
                return int(found.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.read_log()}")
            time.sleep(0.02)
        raise RuntimeError(f"server did not listen in {timeout}s:\n{self.read_log()}")

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

    async def metric(self, name: str, absent: float | None = None) -> float:
        """One sample of the server's /metrics now (see `metric`)."""
        async with httpx.AsyncClient(base_url=self.http, timeout=10) as http:
            return metric((await http.get("/metrics")).text, name, absent)

    @contextlib.asynccontextmanager
    async def connect(self, user: str, **kwargs: Any) -> AsyncIterator[Client]:
        headers = {"Authorization": f"Bearer {make_token(user)}"}
        async with websockets.connect(self.ws_url, additional_headers=headers, **kwargs) as ws:
            client = Client(ws)
            hello = await client.recv()
            assert hello["type"] == "system_message", hello
            client.hello = hello
            yield client
            # Not reached when the test body raised: its own failure is the one to report.
            await client.settle()
            client.check_runs()


class Client:
    """A test client that records every frame it receives, pings included, in `frames`.

    `recv`, `recv_type` and `ask` hand out frames one at a time as before, but nothing they
    skip is lost: `frames` keeps the whole sequence for assertions. `run_events` returns every
    live frame of a run seen on this connection. On leaving `ServerProcess.connect` the client
    reads on for `SETTLE_S` after the last terminal event it saw and checks the run invariants
    (`check_runs`): per run at most one terminal event and no frame after it, seqs increasing,
    event ids unique, and every `resume` replay in order without duplicates.
    """

    SETTLE_S = 0.25

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}
        self.frames: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self._next = 0  # index in `frames` of the next frame `recv` hands out
        # Per frame: the number of the resume replay window it arrived in, or None (live).
        self._window_of: list[int | None] = []
        self._open_windows: dict[str, int] = {}  # thread id -> window number
        self._windows_sent = 0
        self._last_terminal_at = 0.0

    async def send(self, message: dict[str, Any] | str) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
            if isinstance(parsed, dict):
                self.sent.append(parsed)
                if parsed.get("type") == "resume" and isinstance(parsed.get("thread_id"), str):
                    self._windows_sent += 1
                    self._open_windows[parsed["thread_id"]] = self._windows_sent
        await self.ws.send(text)

    async def _read(self, timeout: float) -> dict[str, Any]:
        """Read one frame from the socket and record it (answering a ping)."""
        frame = dict(json.loads(await asyncio.wait_for(self.ws.recv(), timeout)))
        thread = frame.get("thread_id")
        window = self._open_windows.get(thread) if "seq" in frame else None  # type: ignore[arg-type]
        self.frames.append(frame)
        self._window_of.append(window)
        if frame["type"] == "resume_complete":
            self._open_windows.pop(frame.get("thread_id"), None)  # type: ignore[arg-type]
        elif frame["type"] == "error" and frame.get("code") == "not_found":
            # A refused resume opens no replay: forget windows that have received nothing.
            used = set(self._window_of)
            for key, number in list(self._open_windows.items()):
                if number not in used:
                    del self._open_windows[key]
        if frame["type"] in TERMINAL and window is None:
            self._last_terminal_at = time.monotonic()
        if frame["type"] == "ping":
            with contextlib.suppress(websockets.ConnectionClosed):
                await self.send({"type": "pong"})
        return frame

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next frame not handed out yet, pings skipped (but answered and recorded);
        TimeoutError if none arrives within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self._next >= len(self.frames):
                if (left := deadline - time.monotonic()) <= 0:
                    raise TimeoutError(f"no frame within {timeout}s")
                await self._read(left)
            frame = self.frames[self._next]
            self._next += 1
            if frame["type"] != "ping":
                return frame

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

    def events_of(self, run_id: str) -> list[dict[str, Any]]:
        """The run's events received so far, live or replayed, each once, in arrival order."""
        seen: set[str] = set()
        events = []
        for frame in self.frames:
            if frame.get("run_id") == run_id and "seq" in frame and frame["event_id"] not in seen:
                seen.add(frame["event_id"])
                events.append(frame)
        return events

    async def run_events(self, run_id: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Every live event of `run_id` on this connection, up to and including its terminal
        event (also those an earlier `recv` handed out). Exactly one terminal, and it is last."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events_of(run_id)
            if any(e["type"] in TERMINAL for e in events):
                break
            await self.recv(max(0.1, deadline - time.monotonic()))
        terminals = [i for i, e in enumerate(events) if e["type"] in TERMINAL]
        assert terminals == [len(events) - 1], f"terminal events not exactly one, last: {events}"
        last = next(i for i, f in enumerate(self.frames) if f is events[-1])
        self._next = max(self._next, last + 1)
        return events

    async def replay(self, thread_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        """Send `resume` and return the replayed frames up to (not including) resume_complete."""
        await self.send({"type": "resume", "thread_id": thread_id, "after_seq": after_seq})
        frames = []
        while (frame := await self.recv())["type"] != "resume_complete":
            frames.append(frame)
        return frames

    async def settle(self, seconds: float | None = None) -> None:
        """Read (and record) whatever arrives until `seconds` after the last terminal event."""
        wait = self.SETTLE_S if seconds is None else seconds
        with contextlib.suppress(websockets.ConnectionClosed):
            while (left := self._last_terminal_at + wait - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await self._read(left)

    def check_runs(self) -> None:
        """The run invariants over everything this connection received (see the class doc)."""
        live: dict[str, list[dict[str, Any]]] = {}
        replays: dict[int, list[dict[str, Any]]] = {}
        for frame, window in zip(self.frames, self._window_of, strict=True):
            if "seq" not in frame:
                continue
            if window is None:
                live.setdefault(frame["run_id"], []).append(frame)
            else:
                replays.setdefault(window, []).append(frame)
        for run_id, events in live.items():
            kinds = [e["type"] for e in events]
            ends = [i for i, kind in enumerate(kinds) if kind in TERMINAL]
            assert len(ends) <= 1, f"run {run_id} has {len(ends)} terminal events: {kinds}"
            assert not ends or ends[0] == len(kinds) - 1, f"run {run_id} went on after: {kinds}"
            seqs = [e["seq"] for e in events]
            assert seqs == sorted(set(seqs)), f"run {run_id} seqs out of order: {seqs}"
        ids = [f["event_id"] for events in live.values() for f in events]
        live_ids = set(ids)
        assert len(ids) == len(live_ids), "an event was delivered live twice"
        for number, frames in replays.items():
            # A resume the server reads after the connection's hold window may see live events
            # overtake its replay (docs/protocol.md): so the window is at most two increasing
            # runs, live then replay; never a duplicate, never an event already sent live.
            seqs = [f["seq"] for f in frames]
            descents = sum(1 for a, b in itertools.pairwise(seqs) if b <= a)
            assert descents <= 1, f"resume replay {number} out of order: {seqs}"
            assert len(seqs) == len(set(seqs)), f"resume replay {number} duplicated: {seqs}"
            again = [f["seq"] for f in frames if f["event_id"] in live_ids]
            assert not again, f"resume replay {number} resent events sent live: {again}"


class CuttingProxy:
    """Forwards loopback TCP to Parley; `cut()` closes every connection it carries."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
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


def trigger() -> str:
    """A unique word that makes the scripted model answer as a test scripted it."""
    return f"T{uuid.uuid4().hex[:12]}"


def metric(text: str, name: str, absent: float | None = None) -> float:
    """The value of one sample line `name value` in Prometheus text; `absent` when there is
    no such line (a labelled counter appears at its first count), else that is an error."""
    line = next((line for line in text.splitlines() if line.startswith(name + " ")), None)
    if line is None:
        assert absent is not None, f"no sample {name}"
        return absent
    return float(line.split()[-1])


def tool_plugin(directory: Path, module: str, source: str) -> dict[str, str]:
    """Write `source` (which defines `TOOLS`) as `module` under `directory`; returns the server
    environment that loads those tools (`EXTRA_TOOLS`, `PYTHONPATH`)."""
    plugins = directory / "plugins"
    plugins.mkdir()
    (plugins / f"{module}.py").write_text(source)
    return {"EXTRA_TOOLS": f"{module}:TOOLS", "PYTHONPATH": str(plugins)}
