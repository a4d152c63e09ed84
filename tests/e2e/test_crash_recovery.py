"""`kill -9` with runs in flight, then a restart on the same data: every accepted message still
ends with exactly one terminal event (`agent_error interrupted`, retryable), `seq` stays dense,
and everything a client saw before the crash is in the replay (events are stored before they
are sent)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import httpx
import websockets

from tests.conftest import SpawnServer
from tests.fakes.llm_server import FakeLLM, Text
from tests.harness import TERMINAL, Client, make_token, unique_user


async def _stream_until_deltas(client: Client, run_ids: set[str]) -> list[dict[str, Any]]:
    """Read until every run in `run_ids` has streamed at least one delta; return what came."""
    seen: list[dict[str, Any]] = []
    streaming: set[str] = set()
    while streaming != run_ids:
        frame = await client.recv(timeout=20)
        if "seq" in frame:
            seen.append(frame)
            assert frame["type"] not in TERMINAL, f"a run ended before the crash: {frame}"
            if frame["type"] == "agent_message_delta":
                streaming.add(frame["run_id"])
    return seen


async def test_kill_9_with_runs_in_flight_ends_each_with_interrupted_after_restart(
    spawn: SpawnServer, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    data = tmp_path / "crash"
    slow = fake_llm.script(f"T{uuid.uuid4().hex[:10]}", Text("tick " * 400, chunk=5, delay_s=0.05))
    server = spawn(data_dir=data, MAX_RUNS_PER_USER="4")
    users = [unique_user("crash") for _ in range(3)]
    accepted: dict[str, list[dict[str, Any]]] = {}  # user -> message_accepted frames
    seen: dict[str, list[dict[str, Any]]] = {}  # user -> run events received before the kill
    finished: dict[str, str] = {}  # user -> a run that completed before the crash

    async def load(user: str, stack: contextlib.AsyncExitStack) -> None:
        # A bare connection, not `server.connect`: its exit checks need a live server.
        headers = {"Authorization": f"Bearer {make_token(user)}"}
        client = Client(
            await stack.enter_async_context(
                websockets.connect(server.ws_url, additional_headers=headers)
            )
        )
        assert (await client.recv())["type"] == "system_message"
        done = await client.ask("a short question first")
        await client.run_events(done["run_id"])
        finished[user] = done["run_id"]
        accepted[user] = [
            await client.ask(f"stream for a long time {slow}", thread_id=done["thread_id"]),
            await client.ask(f"and in a thread of its own {slow}", client_message_id="c1"),
        ]
        assert all(a["type"] == "message_accepted" for a in accepted[user]), accepted[user]
        seen[user] = await _stream_until_deltas(client, {a["run_id"] for a in accepted[user]})

    async with contextlib.AsyncExitStack() as stack:
        await asyncio.gather(*(load(user, stack) for user in users))
        server.stop(signal.SIGKILL)  # every run is streaming now
    assert server.exit_code == -signal.SIGKILL

    restarted = spawn(data_dir=data)
    for user in users:
        threads = {a["thread_id"] for a in accepted[user]}
        async with restarted.connect(user) as client:
            replays = {
                thread: [e for e in await client.replay(thread) if "seq" in e] for thread in threads
            }
            # The same client_message_id after the restart: the same run, nothing new.
            again = await client.ask(f"and in a thread of its own {slow}", client_message_id="c1")
            assert again["run_id"] == accepted[user][1]["run_id"]
        for events in replays.values():
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "seq not dense"
        everything = [e for events in replays.values() for e in events]
        by_id = {e["event_id"]: e for e in everything}
        for frame in seen[user]:
            assert by_id.get(frame["event_id"]) == frame, "an event was sent but not stored"
        for run in [*accepted[user], {"run_id": finished[user]}]:
            events = [e for e in everything if e["run_id"] == run["run_id"]]
            terminals = [e for e in events if e["type"] in TERMINAL]
            assert len(terminals) == 1, [e["type"] for e in events]
            assert terminals[0] is events[-1]
            if run["run_id"] == finished[user]:
                assert terminals[0]["type"] == "agent_completed"
            else:
                assert terminals[0]["type"] == "agent_error", terminals[0]
                assert terminals[0]["code"] == "interrupted"
                assert terminals[0]["retryable"] is True

        # The HTTP API tells the same story.
        headers = {"Authorization": f"Bearer {restarted.token(user)}"}
        async with httpx.AsyncClient(base_url=restarted.http, headers=headers) as http:
            for thread, events in replays.items():
                stored = (await http.get(f"/api/threads/{thread}/events")).json()["events"]
                assert stored == events


async def test_sqlite_wal_is_checkpointed_in_the_background_not_left_to_a_commit(
    spawn: SpawnServer, tmp_path: Path
) -> None:
    """Checkpoints are off the writer's path (a commit that checkpointed stalled every run for
    30-100 ms): none happens in a commit, and the checkpointer copies the WAL into the database
    file within about a second of the writes."""
    data = tmp_path / "wal"
    server = spawn(data_dir=data)
    database = data / "parley.db"
    await asyncio.sleep(1.5)  # startup's own writes checkpointed
    before = database.stat().st_mtime_ns, database.read_bytes()
    async with server.connect(unique_user()) as client:
        for i in range(3):
            accepted = await client.ask(f"write something {i}")
            await client.run_events(accepted["run_id"])
        # Stored (in the WAL, which readers see at once).
        with contextlib.closing(sqlite3.connect(database)) as reader:
            (runs,) = reader.execute("SELECT count(*) FROM runs").fetchone()
        assert runs == 3
        await asyncio.sleep(2.5)
    after = database.stat().st_mtime_ns, database.read_bytes()
    assert after != before


async def test_sqlite_wal_starts_over_while_runs_keep_writing(
    spawn: SpawnServer, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    """While runs keep writing, the WAL is still checkpointed to its end and started over (its
    header's salt changes each time), so it does not grow for as long as the load lasts. (At
    this light load a checkpoint beside the writer would catch up too; under heavy load only
    the pass between two of the writer's transactions completes, which this test cannot load
    the machine enough to show.)"""
    data = tmp_path / "busy"
    server = spawn(data_dir=data)
    wal = data / "parley.db-wal"
    t = fake_llm.script(f"T{uuid.uuid4().hex[:12]}", Text("word " * 120, chunk=5, delay_s=0.04))
    salts = []

    async def one_stream() -> None:
        async with server.connect(unique_user()) as client:
            accepted = await client.ask(f"keep writing {t}")
            events = await client.run_events(accepted["run_id"], timeout=30)
            assert events[-1]["type"] == "agent_completed"

    streams = [asyncio.create_task(one_stream()) for _ in range(6)]
    for _ in range(8):  # every half second while the streams write
        await asyncio.sleep(0.5)
        salts.append(wal.read_bytes()[16:24])
    await asyncio.gather(*streams)
    assert len(set(salts)) >= 2, "the WAL never started over under load"
