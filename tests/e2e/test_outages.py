"""A Redis or PostgreSQL blip never strands a connected client or fails a run (issue 10).

Each test runs real `parley serve` processes against PostgreSQL and Redis servers of its own,
which it stops and restarts in the middle of a run streaming 60 words 50 ms apart: a Redis
restart (clients on the run's instance and on another get every event once, in order), a
PostgreSQL restart (the run completes), a PostgreSQL outage longer than the grace (the run ends
with `storage_unavailable`, stored) and a Redis outage longer than the grace (clients are closed
with 1013 and resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import SpawnServer, spawn_pair
from tests.fakes.llm_server import FakeLLM, Text
from tests.harness import (
    TERMINAL,
    Client,
    PortTaken,
    ServerProcess,
    make_token,
    start_on_private_port,
    unique_user,
)

WORDS = [f"w{i:02d} " for i in range(60)]


def sixty_words(fake: FakeLLM) -> str:
    """Script the 60-word answer (a word every 50 ms, about 3 s); returns its trigger."""
    return fake.script(f"T{uuid.uuid4().hex[:12]}", Text("".join(WORDS), chunk=4, delay_s=0.05))


# -------------------------------------------------------------------------------- the servers


class PrivateRedis:
    """A redis-server of this test's own, which it may kill and restart on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0  # picked by the first start
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on a private port the first time (another if it was taken), then on that one."""
        if self.port:
            self._start_on(self.port)
        else:
            self.port = start_on_private_port(self._start_on)

    def _start_on(self, port: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = self.directory / "redis.log"
        log.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
                *("--logfile", str(log)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_until(lambda: _redis_answers(port), "redis-server did not start", self.proc)
        except AssertionError:
            self.kill()
            if "Address already in use" in log.read_text(errors="replace"):
                raise PortTaken(port) from None
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def subscribers(self, channel: str) -> int:
        name = channel.encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"*3\r\n$6\r\nPUBSUB\r\n$6\r\nNUMSUB\r\n$%d\r\n%s\r\n" % (len(name), name))
            reply = s.recv(4096).split(b"\r\n")
        return int(reply[3][1:])  # *2, $len, channel, :count


class PrivatePostgres:
    """A PostgreSQL cluster of this test's own, which it may stop and start on the same port."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        # Not under pytest's private tmp dir: the server runs as `postgres` and must reach it.
        self.directory = Path(tempfile.mkdtemp(prefix="parley-outage-pg-"))
        self.directory.chmod(0o755)
        self.data = self.directory / "data"
        self.log = self.directory / "log"
        self.port = 0  # picked by the first start

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        self.data.mkdir()
        shutil.chown(self.directory, "postgres")
        shutil.chown(self.data, "postgres")
        self._as_postgres("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust")

    def start(self) -> None:
        """Start on a private port the first time (another if it was taken), then on that one."""
        if self.port:
            self._start_on(self.port)
        else:
            self.port = start_on_private_port(self._start_on)

    def _start_on(self, port: int) -> None:
        options = f"-p {port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        logged = self.log.stat().st_size if self.log.exists() else 0
        try:
            self._as_postgres(
                "pg_ctl", "-D", str(self.data), "-w", "-l", str(self.log), "-o", options, "start"
            )
        except subprocess.CalledProcessError:
            with self.log.open(errors="replace") as log:
                log.seek(logged)
                if "Address already in use" in log.read():
                    raise PortTaken(port) from None
            raise

    def stop(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    async def down_for(self, seconds: float) -> None:
        """Stop the server, and start it again (on the same port) `seconds` later."""
        await asyncio.to_thread(self.stop)
        await asyncio.sleep(seconds)
        await asyncio.to_thread(self.start)

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _as_postgres(self, program: str, *args: str) -> None:
        command = [str(self.bin_dir / program), *args]
        if _is_root():
            command = ["su", "postgres", "-s", "/bin/sh", "-c", subprocess.list2cmdline(command)]
        subprocess.run(command, check=True, capture_output=True, timeout=60)


def _is_root() -> bool:
    return os.geteuid() == 0


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait_until(done: Any, failure: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while not done():
        assert proc.poll() is None, failure
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis(tmp_path / "redis")
    redis.start()
    yield redis
    redis.kill()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed")
    postgres = PrivatePostgres(bin_dir)
    try:
        postgres.init()
        postgres.start()
        yield postgres
    finally:
        postgres.remove()


# -------------------------------------------------------------------------------- helpers


def frames_of(client: Client, run_id: str) -> list[dict[str, Any]]:
    """Every run event of `run_id` this connection received, duplicates included."""
    return [f for f in client.frames if f.get("run_id") == run_id and "seq" in f]


async def stored_events(server: ServerProcess, user: str, thread_id: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {make_token(user)}"}
    async with httpx.AsyncClient(base_url=server.http, headers=headers, timeout=30) as http:
        response = await http.get(f"/api/threads/{thread_id}/events")
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


async def readiness(server: ServerProcess) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        response = await http.get("/health/ready")
    return response.status_code, response.json()


async def wait_readiness(server: ServerProcess, status: int) -> tuple[int, dict[str, Any]]:
    """Readiness once it answers `status`, or as it is after five seconds (it is cached for a
    second, so the first answer after a change may still be the old one)."""
    deadline = time.monotonic() + 5
    while True:
        answer = await readiness(server)
        if answer[0] == status or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.1)


async def wait_subscribed(redis: PrivateRedis, user: str, instances: int) -> None:
    """Wait (bounded, not asserted) until `instances` servers listen for the user's events."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if redis.subscribers(f"parley:events:{user}") >= instances:
                return
        await asyncio.sleep(0.1)


async def wait_metric(server: ServerProcess, name: str, value: float) -> bool:
    """Whether the metric reaches `value` within ten seconds."""
    deadline = time.monotonic() + 10
    while await server.metric(name) != value:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def wait_stored_terminal(
    server: ServerProcess, user: str, thread_id: str
) -> list[dict[str, Any]]:
    """The thread's stored events once its last run has ended (bounded wait)."""
    deadline = time.monotonic() + 30
    while (events := await stored_events(server, user, thread_id))[-1]["type"] not in TERMINAL:
        assert time.monotonic() < deadline, "the run never ended"
        await asyncio.sleep(0.2)
    return events


def answer_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "agent_message_delta")


def assert_dense(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"seq not dense: {seqs}"


@contextlib.asynccontextmanager
async def sixty_words_under_way(
    server: ServerProcess, fake_llm: FakeLLM, user: str
) -> AsyncIterator[tuple[Client, dict[str, Any]]]:
    """A client of `user` connected to `server`, and the message_accepted of its run of the
    60-word answer, which has streamed three deltas (about 2.5 s of it still to come)."""
    async with server.connect(user) as client:
        accepted = await client.ask(f"sixty words {sixty_words(fake_llm)}")
        for _ in range(3):
            await client.recv_type("agent_message_delta")
        yield client, accepted


async def through_an_outage(
    server: ServerProcess, fake_llm: FakeLLM, user: str, postgres: PrivatePostgres, seconds: float
) -> tuple[Client, dict[str, Any], list[dict[str, Any]]]:
    """`sixty_words_under_way`, with PostgreSQL down for `seconds` three deltas in: the client,
    the run's message_accepted, and the run's events as the client received them live."""
    async with sixty_words_under_way(server, fake_llm, user) as (client, accepted):
        await postgres.down_for(seconds)
        seen = await client.run_events(accepted["run_id"], timeout=40)
        await client.settle(1.0)
    return client, accepted, seen


async def stored_as_delivered(
    server: ServerProcess, user: str, client: Client, accepted: dict[str, Any]
) -> list[dict[str, Any]]:
    """The run's thread as stored, checked to be what `client` received of the run (every event
    once, in order) with seq dense."""
    stored = await stored_events(server, user, accepted["thread_id"])
    assert frames_of(client, accepted["run_id"]) == stored
    assert_dense(stored)
    return stored


# -------------------------------------------------------------------------------- Redis


@pytest.mark.postgres
@pytest.mark.redis
async def test_redis_restarted_mid_run_clients_on_both_instances_get_every_event_once_in_order(
    spawn: SpawnServer, fake_llm: FakeLLM, postgres_url: str, private_redis: PrivateRedis
) -> None:
    a, b = spawn_pair(spawn, postgres_url, private_redis.url)
    user = unique_user()
    trigger = sixty_words(fake_llm)
    async with a.connect(user) as on_a, b.connect(user) as on_b:
        await wait_subscribed(private_redis, user, instances=2)
        accepted = await on_a.ask(f"sixty words {trigger}")
        run_id = accepted["run_id"]
        for _ in range(3):
            await on_b.recv_type("agent_message_delta")
        private_redis.kill()  # mid-run: about 2.5 s of the answer still to come
        await asyncio.sleep(2.0)
        private_redis.start()
        await on_a.run_events(run_id, timeout=30)
        await on_b.run_events(run_id, timeout=30)
        await on_a.settle(1.0)
        await on_b.settle(1.0)
        # Neither client had to reconnect.
        assert on_a.ws.close_code is None
        assert on_b.ws.close_code is None
    stored = await stored_events(a, user, accepted["thread_id"])
    assert stored[-1]["type"] == "agent_completed"
    assert_dense(stored)
    assert answer_of(stored) == "".join(WORDS)
    # Exactly once and in order, on the run's own instance and on the other one.
    assert frames_of(on_a, run_id) == stored
    assert frames_of(on_b, run_id) == stored


@pytest.mark.postgres
async def test_redis_down_longer_than_the_grace_closes_clients_with_1013_and_they_resume(
    spawn: SpawnServer, fake_llm: FakeLLM, postgres_url: str, private_redis: PrivateRedis
) -> None:
    server = spawn(
        DATABASE_URL=postgres_url, REDIS_URL=private_redis.url, EVENT_BUS_OUTAGE_GRACE_S="1"
    )
    user = unique_user()
    trigger = sixty_words(fake_llm)
    async with server.connect(user) as client:
        accepted = await client.ask(f"sixty words {trigger}")
        await client.recv_type("agent_message_delta")
        private_redis.kill()
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:  # the run still streams to this instance's own client, then 1013
                await client.recv(timeout=30)
        close_code, close_reason = client.ws.close_code, client.ws.close_reason
    assert close_code == 1013
    assert "resume" in (close_reason or "")
    status, body = await readiness(server)
    assert status == 503
    assert body["components"]["event_bus"]["status"] == "down"
    # Redis is still down: the run completes anyway, and a client that resumes gets it all.
    stored = await wait_stored_terminal(server, user, accepted["thread_id"])
    async with server.connect(user) as again:
        replayed = await again.replay(accepted["thread_id"])
    assert stored[-1]["type"] == "agent_completed"
    assert answer_of(stored) == "".join(WORDS)
    assert_dense(stored)
    assert replayed == stored


# -------------------------------------------------------------------------------- PostgreSQL


@pytest.mark.redis
async def test_postgres_restarted_mid_run_the_run_completes_and_new_messages_get_unavailable(
    spawn: SpawnServer, fake_llm: FakeLLM, private_postgres: PrivatePostgres, redis_url: str
) -> None:
    server = spawn(DATABASE_URL=private_postgres.url, REDIS_URL=redis_url)
    user = unique_user()
    async with sixty_words_under_way(server, fake_llm, user) as (client, accepted):
        stopped_at = time.monotonic()
        await asyncio.to_thread(private_postgres.stop)
        refused = await client.ask("a new message while the database is down")
        # A resume cannot be checked against the database now: answered, connection kept.
        await client.send({"type": "resume", "thread_id": accepted["thread_id"], "after_seq": 0})
        resume_refused = await client.recv_type("error", timeout=30)
        outage_seen = await wait_metric(server, "parley_database_outage", 1.0)
        status, body = await wait_readiness(server, 503)
        await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - stopped_at)))
        await asyncio.to_thread(private_postgres.start)
        seen = await client.run_events(accepted["run_id"], timeout=40)
        await client.settle(1.0)
    assert refused["type"] == "error", refused
    assert refused["code"] == "unavailable"
    assert resume_refused["code"] == "unavailable", resume_refused
    assert outage_seen
    assert status == 503
    assert body["components"]["database"]["status"] == "down"
    assert seen[-1]["type"] == "agent_completed", seen[-1]
    assert answer_of(seen) == "".join(WORDS) == seen[-1]["content"]
    await stored_as_delivered(server, user, client, accepted)
    assert await wait_metric(server, "parley_database_outage", 0.0)


@pytest.mark.redis
async def test_postgres_down_longer_than_the_grace_ends_the_run_with_storage_unavailable_stored(
    spawn: SpawnServer, fake_llm: FakeLLM, private_postgres: PrivatePostgres, redis_url: str
) -> None:
    server = spawn(
        DATABASE_URL=private_postgres.url, REDIS_URL=redis_url, DATABASE_OUTAGE_GRACE_S="1"
    )
    user = unique_user()
    # Down past the grace, and past the end of the model's answer.
    client, accepted, seen = await through_an_outage(server, fake_llm, user, private_postgres, 4.0)
    assert seen[-1]["type"] == "agent_error", seen[-1]
    assert seen[-1]["code"] == "storage_unavailable"
    assert seen[-1]["retryable"] is True
    stored = await stored_as_delivered(server, user, client, accepted)
    assert [e for e in stored if e["type"] in TERMINAL] == [seen[-1]]  # stored, once
    assert await server.metric('parley_eventlog_refused_total{reason="grace"}') > 0


@pytest.mark.redis
async def test_events_beyond_the_outage_backlog_end_the_run_with_storage_unavailable(
    spawn: SpawnServer, fake_llm: FakeLLM, private_postgres: PrivatePostgres, redis_url: str
) -> None:
    server = spawn(
        DATABASE_URL=private_postgres.url, REDIS_URL=redis_url, DATABASE_OUTAGE_BACKLOG="1"
    )
    user = unique_user()
    # Down well within the grace: only the backlog is exceeded.
    client, accepted, seen = await through_an_outage(server, fake_llm, user, private_postgres, 2.0)
    assert seen[-1]["type"] == "agent_error", seen[-1]
    assert seen[-1]["code"] == "storage_unavailable"
    await stored_as_delivered(server, user, client, accepted)
    assert await server.metric('parley_eventlog_refused_total{reason="backlog"}') > 0
