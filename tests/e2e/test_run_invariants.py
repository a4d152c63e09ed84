"""Every accepted run ends exactly once, under every race (issue 11), end to end.

Each test starts real `parley serve` processes (SQLite, or PostgreSQL and Redis) and drives the
race the issue found through the wire protocol, the HTTP API or the store itself: a stop right
after acceptance, `parley check` beside a live server, two sweepers at once, a long replay while
other things happen on the connection, a body that ignores cancellation, concurrent submits,
a failed Redis SUBSCRIBE, a drain with Redis, and Redis restarting mid-run (issue 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import websockets

from tests.conftest import SpawnServer, llm_env, spawn_pair
from tests.fakes.llm_server import FakeLLM, Text, ToolCall
from tests.harness import (
    TERMINAL,
    Client,
    ServerProcess,
    base_env,
    make_token,
    parley_command,
    tool_plugin,
    trigger,
    unique_user,
)


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def slow_text(seconds: float) -> Text:
    """An answer that streams for about `seconds` (a token every 50 ms)."""
    return Text("tick " * int(seconds * 20), chunk=5, delay_s=0.05)


async def stored_events(
    server: ServerProcess, user: str, thread_id: str, after_seq: int = 0
) -> list[dict[str, Any]]:
    """The thread's whole event log over HTTP, paged (the frames exactly as sent)."""
    events: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {make_token(user)}"}
    async with httpx.AsyncClient(base_url=server.http, headers=headers, timeout=30) as http:
        while True:
            response = await http.get(
                f"/api/threads/{thread_id}/events", params={"after_seq": after_seq}
            )
            assert response.status_code == 200, response.text
            page = response.json()["events"]
            events.extend(page)
            if len(page) < 1000:
                return events
            after_seq = page[-1]["seq"]


def terminals_of(events: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e["run_id"] == run_id and e["type"] in TERMINAL]


async def wait_ready(server: ServerProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=server.http) as http:
        while True:
            response = await http.get("/health/ready")
            if response.status_code == 200:
                return
            assert time.monotonic() < deadline, response.text
            await asyncio.sleep(0.1)


async def read_until(
    client: Client, done: Any, timeout: float = 20.0, what: str = "frames"
) -> None:
    """Read frames (recorded in `client.frames`) until `done()` holds."""
    deadline = time.monotonic() + timeout
    while not done():
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {what}; got {types(client.frames[-20:])}"
        await client.recv(left)


async def read_until_closed(client: Client, timeout: float = 30.0) -> None:
    """Read (and record) every frame until the server closes the connection."""
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            await client.recv(timeout)


# --------------------------------------------------------------------------------------------
# 1. stop_agent right after message_accepted


async def test_stop_agent_sent_right_after_message_accepted_ends_the_run_cancelled(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    t = fake_llm.script(trigger(), slow_text(2))  # would complete in about two seconds
    user = unique_user()
    async with server.connect(user) as client:
        for attempt in range(5):
            accepted = await client.ask(f"stop me at once {attempt} {t}")
            assert accepted["type"] == "message_accepted", accepted
            await client.send({"type": "stop_agent", "run_id": accepted["run_id"]})
            events = await client.run_events(accepted["run_id"])
            assert events[-1]["type"] == "agent_cancelled", (attempt, types(events))
            assert events[-1]["reason"] == "user_requested"
            stored = await stored_events(server, user, accepted["thread_id"])
            assert terminals_of(stored, accepted["run_id"]) == [events[-1]]
        await client.settle()
    # Every stop found its run: none was answered not_found.
    assert [f for f in client.frames if f["type"] == "error"] == []


# --------------------------------------------------------------------------------------------
# 2. parley check beside a live server


async def test_parley_check_beside_a_live_server_on_the_same_sqlite_changes_nothing(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn()
    t = fake_llm.script(trigger(), slow_text(40))
    user = unique_user()
    async with server.connect(user) as client:
        accepted = await client.ask(f"keep talking {t}")
        await client.recv_type("agent_message_delta")
        check = await asyncio.create_subprocess_exec(
            *parley_command("check"),
            env=server.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(check.communicate(), 60)
        assert check.returncode == 0, output.decode()
        # The run is still in progress: nothing ended it behind the server's back.
        assert not terminals_of(client.events_of(accepted["run_id"]), accepted["run_id"])
        await client.send({"type": "stop_agent", "run_id": accepted["run_id"]})
        events = await client.run_events(accepted["run_id"])
        await client.settle(0.5)
    assert events[-1]["type"] == "agent_cancelled"
    assert events[-1]["reason"] == "user_requested"
    stored = await stored_events(server, user, accepted["thread_id"])
    assert terminals_of(stored, accepted["run_id"]) == [events[-1]]
    assert stored == events  # the store has exactly what the client saw live, nothing more


# --------------------------------------------------------------------------------------------
# 3. two sweepers


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


def _frame(kind: str, thread_id: str, run_id: str, seq: int, **fields: Any) -> str:
    return json.dumps(
        {
            "type": kind,
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "thread_id": thread_id,
            "run_id": run_id,
            "seq": seq,
            "event_id": str(uuid.uuid4()),
            **fields,
        },
        separators=(",", ":"),
    )


async def _insert_stale_runs(dsn: str, user: str, count: int) -> tuple[str, list[str]]:
    """A thread with `count` runs left `running` an hour ago, each with its agent_started."""
    connection = await asyncpg.connect(dsn)
    try:
        an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
        thread_id = str(uuid.uuid4())
        run_ids = []
        async with connection.transaction():
            await connection.execute(
                "INSERT INTO users (id, created_at) VALUES ($1, $2)", user, an_hour_ago
            )
            await connection.execute(
                "INSERT INTO threads (id, user_id, title, last_seq, created_at, updated_at)"
                " VALUES ($1, $2, 'stale', $3, $4, $4)",
                thread_id,
                user,
                count,
                an_hour_ago,
            )
            for seq in range(1, count + 1):
                run_id, message_id = str(uuid.uuid4()), str(uuid.uuid4())
                run_ids.append(run_id)
                await connection.execute(
                    "INSERT INTO messages (id, thread_id, user_id, role, content, run_id,"
                    " created_at) VALUES ($1, $2, $3, 'user', $4, $5, $6)",
                    message_id,
                    thread_id,
                    user,
                    f"question {seq}",
                    run_id,
                    an_hour_ago,
                )
                await connection.execute(
                    "INSERT INTO runs (id, thread_id, user_id, message_id, agent, status,"
                    " input_tokens, output_tokens, instance_id, started_at)"
                    " VALUES ($1, $2, $3, $4, 'assistant', 'running', 0, 0, 'dead-instance', $5)",
                    run_id,
                    thread_id,
                    user,
                    message_id,
                    an_hour_ago,
                )
                frame = _frame(
                    "agent_started",
                    thread_id,
                    run_id,
                    seq,
                    agent="assistant",
                    message_id=message_id,
                )
                await connection.execute(
                    "INSERT INTO events (id, thread_id, run_id, seq, type, frame, created_at)"
                    " VALUES ($1, $2, $3, $4, 'agent_started', $5, $6)",
                    json.loads(frame)["event_id"],
                    thread_id,
                    run_id,
                    seq,
                    frame,
                    an_hour_ago,
                )
        return thread_id, run_ids
    finally:
        await connection.close()


@contextlib.contextmanager
def stopping(*servers: ServerProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for server in servers:
            server.stop()


@pytest.mark.postgres
async def test_two_instances_sweeping_at_once_end_each_stale_run_once(
    fake_llm: FakeLLM, postgres_url: str, tmp_path: Path
) -> None:
    env = {**llm_env(fake_llm), "DATABASE_URL": postgres_url}
    migrate = await asyncio.create_subprocess_exec(
        *parley_command("migrate"),
        env=base_env(tmp_path / "migrate", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(migrate.communicate(), 120)
    assert migrate.returncode == 0, output.decode()
    user = unique_user()
    # Many stale runs, so that the two sweeps overlap in time however the starts interleave.
    thread_id, run_ids = await _insert_stale_runs(_dsn(postgres_url), user, 60)
    a = ServerProcess(base_env(tmp_path / "a", **env))
    b = ServerProcess(base_env(tmp_path / "b", **env))
    with stopping(a, b):
        # Both start at once: each sweeps before it serves.
        await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
        events = await stored_events(a, user, thread_id)
    errors = [e for e in events if e["type"] == "agent_error"]
    assert sorted(e["run_id"] for e in errors) == sorted(run_ids), "a run ended twice or never"
    assert {(e["code"], e["retryable"]) for e in errors} == {("interrupted", True)}
    assert [e["seq"] for e in events] == list(range(1, 2 * len(run_ids) + 1))
    assert len({e["event_id"] for e in events}) == len(events)
    connection = await asyncpg.connect(_dsn(postgres_url))
    try:
        statuses = await connection.fetch(
            "SELECT status, error_code, count(*) AS n FROM runs GROUP BY status, error_code"
        )
        last_seq = await connection.fetchval(
            "SELECT last_seq FROM threads WHERE id = $1", thread_id
        )
    finally:
        await connection.close()
    assert [(r["status"], r["error_code"], r["n"]) for r in statuses] == [
        ("error", "interrupted", len(run_ids))
    ]
    assert last_seq == 2 * len(run_ids)


# --------------------------------------------------------------------------------------------
# 4. a long replay beside live events and stop_agent

REPLAYED = 5000


def _append_synthetic_deltas(db_path: Path, thread_id: str, count: int) -> int:
    """Add `count` stored agent_message_delta events to the thread; returns its new last_seq.
    The server must be stopped."""
    connection = sqlite3.connect(db_path)
    try:
        last_seq, created_at, run_id = connection.execute(
            "SELECT t.last_seq, e.created_at, e.run_id FROM threads t"
            " JOIN events e ON e.thread_id = t.id WHERE t.id = ? ORDER BY e.seq DESC LIMIT 1",
            (thread_id,),
        ).fetchone()
        rows = []
        for seq in range(last_seq + 1, last_seq + count + 1):
            text = f"[{seq:05d}]" + "z" * 400  # big enough that the socket buffers fill
            frame = _frame("agent_message_delta", thread_id, run_id, seq, text=text)
            event_id = json.loads(frame)["event_id"]
            rows.append(
                (event_id, thread_id, run_id, seq, "agent_message_delta", frame, created_at)
            )
        connection.executemany(
            "INSERT INTO events (id, thread_id, run_id, seq, type, frame, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        connection.execute(
            "UPDATE threads SET last_seq = ? WHERE id = ?", (last_seq + count, thread_id)
        )
        connection.commit()
        return int(last_seq + count)
    finally:
        connection.close()


@pytest.mark.parametrize("send_queue_size", [64, 1024])
async def test_replay_of_5000_events_completes_beside_live_events_and_stop_agent_is_answered(
    spawn: SpawnServer, fake_llm: FakeLLM, tmp_path: Path, send_queue_size: int
) -> None:
    user = unique_user()
    data_dir = tmp_path / "replay"
    first = spawn(data_dir=data_dir)
    async with first.connect(user) as client:
        seeded = await client.ask("the thread to replay")
        await client.run_events(seeded["run_id"])
    first.stop()
    thread_id = seeded["thread_id"]
    last_seq = _append_synthetic_deltas(data_dir / "parley.db", thread_id, REPLAYED)

    server = spawn(data_dir=data_dir, SEND_QUEUE_SIZE=str(send_queue_size))
    t = fake_llm.script(trigger(), slow_text(30))
    async with server.connect(user) as client:
        live = await client.ask(f"meanwhile in another thread {t}")
        await client.send({"type": "resume", "thread_id": thread_id, "after_seq": 0})
        await client.send({"type": "stop_agent", "run_id": live["run_id"]})
        resumed_at = len(client.frames)
        await asyncio.sleep(1.5)  # not reading: the replay cannot finish before the stop
        try:
            await read_until(
                client,
                lambda: (
                    any(f["type"] == "resume_complete" for f in client.frames)
                    and terminals_of(client.events_of(live["run_id"]), live["run_id"])
                ),
                timeout=60,
                what="resume_complete and the live run's end",
            )
        except websockets.ConnectionClosed as closed:
            pytest.fail(f"the connection was closed during the replay: {closed}")
    frames = client.frames[resumed_at:]
    kinds = [f["type"] for f in frames]
    complete = kinds.index("resume_complete")
    replayed = [f for f in frames[:complete] if f.get("thread_id") == thread_id]
    assert [f["seq"] for f in replayed] == list(range(1, last_seq + 1))
    assert frames[complete]["last_seq"] == last_seq
    ended = next(i for i, f in enumerate(frames) if f is client.events_of(live["run_id"])[-1])
    assert frames[ended]["type"] == "agent_cancelled"
    assert ended < complete, "stop_agent was not handled until the replay had finished"
    assert [f for f in client.frames if f["type"] == "error"] == []


# --------------------------------------------------------------------------------------------
# 5. a body that ignores cancellation

STUBBORN_TOOLS = """
import asyncio
import time

from pydantic_ai import RunContext


async def stubborn(ctx: RunContext) -> str:
    '''Waits, and swallows every cancellation for a long while.'''
    until = time.monotonic() + {seconds}
    while time.monotonic() < until:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass
    return 'finally done'


TOOLS = [stubborn]
"""


async def test_a_run_whose_body_ignores_cancellation_still_ends_at_its_deadline(
    spawn: SpawnServer, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    run_timeout_s = 3.0
    server = spawn(
        **tool_plugin(tmp_path, "stubborn_tools", STUBBORN_TOOLS.format(seconds=20)),
        RUN_TIMEOUT_S=str(run_timeout_s),
        TOOL_TIMEOUT_S="60",
    )
    t = fake_llm.script(trigger(), ToolCall([("stubborn", {})]), Text("too late"))
    user = unique_user()
    async with server.connect(user) as client:
        accepted = await client.ask(f"be stubborn {t}")
        started = time.monotonic()
        # Well before the stubborn tool's 20 s: the bound only says "not never".
        events = await client.run_events(accepted["run_id"], timeout=run_timeout_s + 12)
        elapsed = time.monotonic() - started
        await client.settle(1.5)  # anything of the run after its terminal event shows here
    assert "tool_executing" in types(events)
    assert events[-1]["type"] == "agent_error"
    assert events[-1]["code"] == "timeout"
    assert events[-1]["retryable"] is True
    assert elapsed < run_timeout_s + 12, f"ended after {elapsed:.1f}s"
    assert client.events_of(accepted["run_id"]) == events  # nothing of the run after it
    stored = await stored_events(server, user, accepted["thread_id"])
    assert stored == events
    # The stubborn tool would hold the process's shutdown for its 20 s: no drain needed here.
    server.stop(signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# 6. concurrent submits and the limits


async def _submit_all_at_once(
    clients: list[Client], per_client: int, content: str
) -> list[dict[str, Any]]:
    """Send `per_client` messages on every client at the same moment; return each answer
    (message_accepted or error), matched by client_message_id."""
    ids = [
        [f"{index}-{n}-{uuid.uuid4().hex[:6]}" for n in range(per_client)]
        for index in range(len(clients))
    ]
    await asyncio.gather(
        *(
            client.send(
                {"type": "user_message", "content": f"{content} {n}", "client_message_id": cid}
            )
            for client, cids in zip(clients, ids, strict=True)
            for n, cid in enumerate(cids)
        )
    )

    async def answers(client: Client, cids: list[str]) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]]:
            return [
                f
                for f in client.frames
                if f["type"] in ("message_accepted", "error") and f.get("client_message_id") in cids
            ]

        await read_until(client, lambda: len(found()) >= len(cids), what="answers")
        return found()

    results = await asyncio.gather(
        *(answers(client, cids) for client, cids in zip(clients, ids, strict=True))
    )
    return [answer for result in results for answer in result]


async def _stop_and_finish(clients: list[Client], accepted: list[dict[str, Any]]) -> None:
    for answer in accepted:
        owner = next(c for c in clients if answer in c.frames)
        await owner.send({"type": "stop_agent", "run_id": answer["run_id"]})
        await owner.run_events(answer["run_id"])


async def test_concurrent_submits_of_one_user_never_exceed_max_runs_per_user(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(MAX_RUNS_PER_USER="2", RATE_LIMIT_PER_MINUTE="1000")
    t = fake_llm.script(trigger(), slow_text(20))
    user = unique_user()
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(server.connect(user)) for _ in range(6)]
        answers = await _submit_all_at_once(clients, 2, f"all at once {t}")
        accepted = [a for a in answers if a["type"] == "message_accepted"]
        refused = [a for a in answers if a["type"] == "error"]
        await _stop_and_finish(clients, accepted)
    assert len(answers) == 12
    assert len(accepted) == 2, f"{len(accepted)} runs admitted with MAX_RUNS_PER_USER=2"
    assert {a["code"] for a in refused} == {"rate_limited"}


async def test_a_run_that_ended_frees_its_place_before_the_client_sees_the_end(
    spawn: SpawnServer,
) -> None:
    """With one run allowed per user and in all, a client that sends its next message the
    moment it reads a run's terminal event is admitted every time: the run's place is freed
    when its end is stored, before that end is sent to anyone."""
    server = spawn(MAX_RUNS_PER_USER="1", MAX_CONCURRENT_RUNS="1", RATE_LIMIT_PER_MINUTE="1000")
    async with server.connect(unique_user()) as client:
        thread_id = None
        for number in range(40):
            fields = {"thread_id": thread_id} if thread_id else {}
            answer = await client.ask(f"next {number}", **fields)
            assert answer["type"] == "message_accepted", answer
            thread_id = answer["thread_id"]
            events = await client.run_events(answer["run_id"])
            assert events[-1]["type"] == "agent_completed"


async def test_concurrent_submits_of_many_users_never_exceed_max_concurrent_runs(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(MAX_CONCURRENT_RUNS="3", MAX_RUNS_PER_USER="10", RATE_LIMIT_PER_MINUTE="1000")
    t = fake_llm.script(trigger(), slow_text(20))
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(server.connect(unique_user())) for _ in range(7)]
        answers = await _submit_all_at_once(clients, 2, f"everyone at once {t}")
        accepted = [a for a in answers if a["type"] == "message_accepted"]
        refused = [a for a in answers if a["type"] == "error"]
        await _stop_and_finish(clients, accepted)
    assert len(answers) == 14
    assert len(accepted) == 3, f"{len(accepted)} runs admitted with MAX_CONCURRENT_RUNS=3"
    assert {a["code"] for a in refused} == {"server_busy"}


# --------------------------------------------------------------------------------------------
# Redis: a private server the test may stop and restart (never the shared test Redis)


class PrivateRedis:
    """A redis-server on a Unix socket of its own: no TCP port to race other processes for,
    and the same address after a restart."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            assert self.proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _command(self, *words: str | bytes) -> bytes:
        raw = [w.encode() if isinstance(w, str) else w for w in words]
        request = b"*%d\r\n" % len(raw) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in raw)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.socket))
            s.sendall(request)
            return s.recv(4096)

    def _answers(self) -> bool:
        try:
            return self._command("PING").startswith(b"+PONG")
        except OSError:
            return False

    def publish(self, channel: str, message: str | bytes) -> None:
        assert self._command("PUBLISH", channel, message).startswith(b":")

    def subscribers(self, channel: str) -> int:
        reply = self._command("PUBSUB", "NUMSUB", channel).split(b"\r\n")
        # *2, $len, channel, :count
        return int(reply[3][1:])


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    # A short directory of its own: a Unix socket's path is limited to about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="parley-redis-") as directory:
        redis = PrivateRedis(Path(directory))
        redis.start()
        try:
            yield redis
        finally:
            redis.stop()


async def wait_subscribed(redis: PrivateRedis, user: str, instances: int, timeout: float) -> None:
    """Wait (bounded, not asserted) until `instances` servers subscribe to the user's events."""
    channel = f"parley:events:{user}"  # the bus's channel name (see parley.bus)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if redis.subscribers(channel) >= instances:
                return
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def connected_to_both(
    a: ServerProcess, b: ServerProcess, user: str, redis: PrivateRedis
) -> AsyncIterator[tuple[Client, Client]]:
    """`user` connected to A and to B, once both instances listen for the user's events."""
    async with a.connect(user) as on_a, b.connect(user) as on_b:
        await wait_subscribed(redis, user, instances=2, timeout=10)
        yield on_a, on_b


async def run_on_a_seen_on_b(
    on_a: Client, on_b: Client, content: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Ask on A; the run's events as A delivered them, and as B did (through Redis)."""
    accepted = await on_a.ask(content)
    seen_on_a = await on_a.run_events(accepted["run_id"])
    seen_on_b = await on_b.run_events(accepted["run_id"], timeout=15)
    return seen_on_a, seen_on_b


# --------------------------------------------------------------------------------------------
# 7. a failed SUBSCRIBE is retried


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_subscribe_that_failed_while_redis_was_down_is_retried(
    spawn: SpawnServer, fake_llm: FakeLLM, postgres_url: str, private_redis: PrivateRedis
) -> None:
    a, b = spawn_pair(spawn, postgres_url, private_redis.url)
    user = unique_user()
    t = fake_llm.script(trigger(), Text("hello across instances", chunk=4, delay_s=0.05))
    private_redis.stop()
    async with b.connect(user) as on_b:  # B's SUBSCRIBE for this user fails now
        private_redis.start()
        await wait_ready(a)
        await wait_ready(b)
        async with a.connect(user) as on_a:
            await wait_subscribed(private_redis, user, instances=2, timeout=10)
            seen_on_a, seen_on_b = await run_on_a_seen_on_b(on_a, on_b, f"talk to me {t}")
    assert seen_on_a[-1]["type"] == "agent_completed"
    assert seen_on_b == seen_on_a


# --------------------------------------------------------------------------------------------
# 8. a drain with Redis delivers every terminal event before 1001


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_drain_with_redis_delivers_every_terminal_event_before_closing_with_1001(
    spawn: SpawnServer, fake_llm: FakeLLM, postgres_url: str, private_redis: PrivateRedis
) -> None:
    a, b = spawn_pair(spawn, postgres_url, private_redis.url, SHUTDOWN_GRACE_S="0")
    user = unique_user()
    t = fake_llm.script(trigger(), slow_text(30))
    async with connected_to_both(a, b, user, private_redis) as (on_a, on_b):
        runs = [(await on_a.ask(f"until the server stops {n} {t}")) for n in range(2)]
        for accepted in runs:
            await read_until(
                on_b,
                lambda run=accepted["run_id"]: len(on_b.events_of(run)) >= 3,
                what="the runs' events on B",
            )
        # Redis stalls while A drains: A's terminal events reach B only if A waits for
        # them to be published before it goes (`EventBus.flush`), not if it just exits.
        assert private_redis.proc is not None
        assert a.proc is not None
        private_redis.proc.send_signal(signal.SIGSTOP)
        try:
            a.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(2.0)
        finally:
            private_redis.proc.send_signal(signal.SIGCONT)
        await read_until_closed(on_a)
        seen_on_b = [await on_b.run_events(r["run_id"], timeout=15) for r in runs]
    close_code = on_a.ws.close_code
    seen_on_a = [on_a.events_of(r["run_id"]) for r in runs]
    assert close_code == 1001
    for on_a_events, on_b_events, accepted in zip(seen_on_a, seen_on_b, runs, strict=True):
        assert on_a_events[-1]["type"] == "agent_cancelled", types(on_a_events)[-3:]
        assert on_a_events[-1]["reason"] == "server_shutdown"
        assert on_b_events[-1] == on_a_events[-1]
        stored = await stored_events(b, user, accepted["thread_id"])
        assert terminals_of(stored, accepted["run_id"]) == [on_a_events[-1]]


# --------------------------------------------------------------------------------------------
# 9. Redis killed and restarted mid-run (issue 10, item 1)


@pytest.mark.postgres
@pytest.mark.redis
async def test_redis_killed_and_restarted_mid_run_the_other_instance_still_delivers_everything(
    spawn: SpawnServer, fake_llm: FakeLLM, postgres_url: str, private_redis: PrivateRedis
) -> None:
    a, b = spawn_pair(spawn, postgres_url, private_redis.url)
    user = unique_user()
    words = [f"w{i:02d} " for i in range(60)]
    t = fake_llm.script(trigger(), Text("".join(words), chunk=4, delay_s=0.05))
    async with connected_to_both(a, b, user, private_redis) as (on_a, on_b):
        accepted = await on_a.ask(f"sixty words {t}")
        run_id = accepted["run_id"]
        for _ in range(3):
            await on_b.recv_type("agent_message_delta")
        private_redis.stop(signal.SIGKILL)
        await asyncio.sleep(1.5)
        private_redis.start()
        seen_on_b = await on_b.run_events(run_id, timeout=30)
        seen_on_a = await on_a.run_events(run_id, timeout=30)
        await on_b.settle(1.0)
        assert on_b.ws.close_code is None  # B's client never had to reconnect
    stored = await stored_events(b, user, accepted["thread_id"])
    assert seen_on_a[-1]["type"] == "agent_completed"
    assert seen_on_b == stored == seen_on_a
    assert "".join(e["text"] for e in seen_on_b if e["type"] == "agent_message_delta") == "".join(
        words
    )


# --------------------------------------------------------------------------------------------
# 10. Redis stalled, or carrying a malformed message (issue 11, item 6)


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_stalled_redis_never_holds_up_a_run_or_its_own_instances_clients(
    spawn: SpawnServer, fake_llm: FakeLLM, postgres_url: str, private_redis: PrivateRedis
) -> None:
    a, b = spawn_pair(spawn, postgres_url, private_redis.url)
    user = unique_user()
    words = [f"s{i:02d} " for i in range(20)]
    t = fake_llm.script(trigger(), Text("".join(words), chunk=4, delay_s=0.02))
    async with connected_to_both(a, b, user, private_redis) as (on_a, on_b):
        assert private_redis.proc is not None
        # Redis takes nothing and answers nothing; well within its clients' 10 s timeout.
        private_redis.proc.send_signal(signal.SIGSTOP)
        try:
            accepted = await on_a.ask(f"while redis sleeps {t}")
            seen_on_a = await on_a.run_events(accepted["run_id"], timeout=8)
        finally:
            private_redis.proc.send_signal(signal.SIGCONT)
        # Back, Redis carries what A published meanwhile to B.
        seen_on_b = await on_b.run_events(accepted["run_id"], timeout=20)
    assert seen_on_a[-1]["type"] == "agent_completed"
    assert seen_on_a[-1]["content"] == "".join(words)
    assert seen_on_b == seen_on_a


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_malformed_message_on_a_users_channel_does_not_stop_delivery(
    spawn: SpawnServer, fake_llm: FakeLLM, postgres_url: str, private_redis: PrivateRedis
) -> None:
    a, b = spawn_pair(spawn, postgres_url, private_redis.url)
    user = unique_user()
    t = fake_llm.script(trigger(), Text("still delivered", chunk=4, delay_s=0.02))
    async with connected_to_both(a, b, user, private_redis) as (on_a, on_b):
        # Something other than Parley (or an older Parley) writes on the user's channel.
        for garbage in ("not a parley event", "origin\nthread\nnot-a-seq\n{}", b"\xff\xfe"):
            private_redis.publish(f"parley:events:{user}", garbage)
        seen_on_a, seen_on_b = await run_on_a_seen_on_b(on_a, on_b, f"after the garbage {t}")
    assert seen_on_a[-1]["type"] == "agent_completed"
    assert seen_on_b == seen_on_a


# --------------------------------------------------------------------------------------------
# 11. two instances writing into the same two threads (issue 11, item 6: lock order)


@pytest.mark.postgres
@pytest.mark.redis
async def test_two_instances_streaming_into_the_same_two_threads_never_deadlock(
    spawn: SpawnServer, fake_llm: FakeLLM, postgres_url: str, redis_url: str
) -> None:
    a, b = spawn_pair(spawn, postgres_url, redis_url, MAX_RUNS_PER_USER="8")
    user = unique_user()
    # Fast answers with many small deltas: every batch of each writer holds both threads.
    t = fake_llm.script(trigger(), Text("d" * 1500, chunk=1))
    async with a.connect(user) as on_a, b.connect(user) as on_b:
        threads = []
        for n in range(2):
            seeded = await on_a.ask(f"thread {n}")
            await on_a.run_events(seeded["run_id"])
            threads.append(seeded["thread_id"])
        # A writes thread 0 then 1, B thread 1 then 0: opposite orders if locked as queued.
        pairs = [(on_a, threads[0]), (on_b, threads[1]), (on_a, threads[1]), (on_b, threads[0])]
        accepted = [
            await client.ask(f"stream {n} {t}", thread_id=thread)
            for n, (client, thread) in enumerate(pairs)
        ]
        ended = [
            (await client.run_events(answer["run_id"], timeout=60))[-1]
            for (client, _), answer in zip(pairs, accepted, strict=True)
        ]
    assert [e["type"] for e in ended] == ["agent_completed"] * 4, ended
    for thread in threads:
        stored = await stored_events(a, user, thread)
        assert [e["seq"] for e in stored] == list(range(1, len(stored) + 1))
