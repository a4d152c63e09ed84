"""Group commit (store/group_commit.py): the event log's writer waits before a batch only while
events arrive fast, never longer than the spacing; and a writer stopped while it waits still
stores, publishes and answers the batch it had taken."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.engine import Connection

from parley.bus import InProcessBus
from parley.observability import Metrics
from parley.protocol import AgentThinking
from parley.store import queries
from parley.store.db import Database
from parley.store.eventlog import EventLog
from parley.store.group_commit import CommitPacer


def feed(pacer: CommitPacer, *, every_s: float, size: int, batches: int, start: float) -> float:
    """`batches` batches of `size` events taken `every_s` apart; returns the last one's time."""
    now = start
    for _ in range(batches):
        pacer.batch_taken(now, size)
        now += every_s
    return now - every_s


def test_the_first_batch_and_batches_of_one_conversation_never_wait() -> None:
    pacer = CommitPacer(spacing_s=0.01, busy_rate=2500)
    assert pacer.wait_before_batch(100.0) == 0.0
    # One conversation: its message, its first note and a delta a few hundred µs apart.
    last = feed(pacer, every_s=0.0003, size=1, batches=3, start=100.0)
    assert pacer.wait_before_batch(last + 0.0003) == 0.0


def test_a_burst_after_a_quiet_spell_is_not_taken_for_load() -> None:
    pacer = CommitPacer(spacing_s=0.01, busy_rate=2500)
    last = feed(pacer, every_s=0.05, size=2, batches=10, start=100.0)  # 40 events a second
    pacer.batch_taken(last + 0.05, 25)  # 25 conversations' deltas due at the same moment
    assert pacer.wait_before_batch(last + 0.052) == 0.0


def test_under_load_the_next_batch_waits_until_the_spacing_has_passed() -> None:
    pacer = CommitPacer(spacing_s=0.01, busy_rate=2500)
    # 4,000 events a second, taken every 5 ms.
    last = feed(pacer, every_s=0.005, size=20, batches=40, start=100.0)
    assert pacer.wait_before_batch(last + 0.002) == pytest.approx(0.008)
    assert pacer.wait_before_batch(last + 0.010) == 0.0
    assert pacer.wait_before_batch(last + 0.030) == 0.0


def test_once_the_load_is_gone_nothing_waits() -> None:
    pacer = CommitPacer(spacing_s=0.01, busy_rate=2500)
    last = feed(pacer, every_s=0.01, size=40, batches=40, start=100.0)
    assert pacer.wait_before_batch(last + 0.001) > 0
    # Then a lull of 200 ms, and one conversation's event.
    pacer.batch_taken(last + 0.2, 1)
    assert pacer.wait_before_batch(last + 0.2005) == 0.0


def test_a_spacing_of_zero_never_waits_and_a_rate_of_zero_always_spaces() -> None:
    never = CommitPacer(spacing_s=0.0, busy_rate=0)
    always = CommitPacer(spacing_s=0.01, busy_rate=0)
    for pacer in (never, always):
        pacer.batch_taken(100.0, 1)
    assert never.wait_before_batch(100.001) == 0.0
    assert always.wait_before_batch(100.001) == pytest.approx(0.009)


async def test_a_writer_stopped_while_it_waits_still_stores_the_batch_it_took(
    tmp_path: Path,
) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    await db.migrate()
    bus = InProcessBus()
    # Always waits, and long: the writer is surely waiting when it is stopped.
    log = EventLog(db, bus, Metrics(), pacer=CommitPacer(spacing_s=30.0, busy_rate=0))

    def new_thread(connection: Connection) -> str:
        queries.ensure_user(connection, user_id="ada")
        return queries.create_thread(connection, user_id="ada", title="t")

    thread_id = await db.run_write(new_thread)
    writer = asyncio.create_task(log.run())
    try:
        first = log.post("ada", AgentThinking(text="one", thread_id=thread_id, run_id="r1"))
        await asyncio.sleep(0.2)  # stored at once: nothing was written before it
        assert first.done()
        second = log.post("ada", AgentThinking(text="two", thread_id=thread_id, run_id="r1"))
        third = log.post("ada", AgentThinking(text="three", thread_id=thread_id, run_id="r1"))
        await asyncio.sleep(0.2)
        assert not second.done()  # taken by the writer, which now waits out its spacing
    finally:
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer
        await log.flush()  # as at shutdown
    for future in (second, third):
        assert future.done()
        assert future.exception() is None
    await db.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "store.db")) as store:
        rows = store.execute(
            "SELECT seq, frame FROM events WHERE thread_id = ? ORDER BY seq", (thread_id,)
        ).fetchall()
    assert [(seq, json.loads(frame)["text"]) for seq, frame in rows] == [
        (1, "one"),
        (2, "two"),
        (3, "three"),
    ]
