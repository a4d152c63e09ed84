"""Group commit (store/group_commit.py): the event log's writer waits before a batch only while
events arrive fast, never longer than the spacing; and a writer stopped while it waits still
stores, publishes and answers the batch it had taken."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3

import pytest

from parley.bus import InProcessBus
from parley.observability import Metrics
from parley.protocol import AgentThinking
from parley.store.eventlog import EventLog
from parley.store.group_commit import CommitPacer
from tests.unit.conftest import Store


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
    # Five seconds of 40 events a second (200 in all: only their decay keeps them from counting).
    last = feed(pacer, every_s=0.05, size=2, batches=100, start=100.0)
    pacer.batch_taken(last + 0.05, 25)  # 25 conversations' deltas due at the same moment
    assert pacer.wait_before_batch(last + 0.052) == 0.0


def writer(pacer: CommitPacer, arrivals: list[float]) -> list[tuple[float, float]]:
    """What the writer does with events arriving at `arrivals` (sorted), committing in no
    time: returns when each batch was taken and how long the writer waited before it."""
    batches: list[tuple[float, float]] = []
    taken = 0
    while taken < len(arrivals):
        first = arrivals[taken]
        wait = pacer.wait_before_batch(first)
        start = first + wait
        size = len([t for t in arrivals[taken:] if t <= start])
        pacer.batch_taken(start, size)
        batches.append((start, wait))
        taken += size
    return batches


def test_one_large_batch_makes_the_writer_wait_only_for_a_moment() -> None:
    pacer = CommitPacer(spacing_s=0.01, busy_rate=2500)
    pacer.batch_taken(100.0, 300)  # what queued up while the database was away
    # Then 1,000 events a second (below the busy rate) for one second.
    waits = [wait for _start, wait in writer(pacer, [100.0005 + i / 1000 for i in range(1000)])]
    assert waits[0] > 0
    waited = [i for i, wait in enumerate(waits) if wait > 0]
    assert len(waits) > 900  # nearly every event in a batch of its own: nothing gathered
    assert max(waited) < 20  # the large batch no longer counts after ~100 ms


def test_events_at_the_busy_rate_are_gathered_and_a_trickle_is_not() -> None:
    # 4,000 events a second for one second: once the load is seen (within the horizon), a batch
    # every 10 ms, and never sooner.
    busy = [start for start, _wait in writer(CommitPacer(), [100 + i / 4000 for i in range(4000)])]
    steady = [b - a for a, b in itertools.pairwise(busy) if a >= 100.1]
    assert len(steady) >= 85
    assert min(steady) == pytest.approx(0.01)
    # 1,000 a second: every event at once, alone.
    trickle = writer(CommitPacer(), [100 + i / 1000 for i in range(1000)])
    assert len(trickle) == 1000
    assert not any(wait for _start, wait in trickle)


@pytest.mark.parametrize("spacing_s", [0.01, 1.0])
def test_once_the_load_is_gone_nothing_waits(spacing_s: float) -> None:
    pacer = CommitPacer(spacing_s=spacing_s, busy_rate=2500)
    last = feed(pacer, every_s=spacing_s, size=int(4000 * spacing_s), batches=40, start=100.0)
    assert pacer.wait_before_batch(last + spacing_s / 10) > 0
    # The load stops. After a lull, one event (taken at once: the spacing has passed), and
    # another soon after it, within the spacing: it does not wait either.
    after_lull = last + 30 * spacing_s
    assert pacer.wait_before_batch(after_lull) == 0.0
    pacer.batch_taken(after_lull, 1)
    assert pacer.wait_before_batch(after_lull + spacing_s / 10) == 0.0


def test_a_spacing_of_zero_never_waits_and_a_rate_of_zero_always_spaces() -> None:
    never = CommitPacer(spacing_s=0.0, busy_rate=0)
    always = CommitPacer(spacing_s=0.01, busy_rate=0)
    for pacer in (never, always):
        pacer.batch_taken(100.0, 1)
    assert never.wait_before_batch(100.001) == 0.0
    assert always.wait_before_batch(100.001) == pytest.approx(0.009)


async def test_a_writer_stopped_while_it_waits_still_stores_the_batch_it_took(
    store: Store,
) -> None:
    thread_id = store.thread_id
    # Always waits, and long: the writer is surely waiting when it is stopped.
    log = EventLog(
        store.db, InProcessBus(), Metrics(), pacer=CommitPacer(spacing_s=30.0, busy_rate=0)
    )
    writer = asyncio.create_task(log.run())
    try:
        first = log.post("ada", AgentThinking(text="one", thread_id=thread_id, run_id="r1"))
        await asyncio.wait_for(first, 10)  # stored at once: nothing was written before it
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
    with contextlib.closing(sqlite3.connect(store.path)) as connection:
        rows = connection.execute(
            "SELECT seq, frame FROM events WHERE thread_id = ? ORDER BY seq", (thread_id,)
        ).fetchall()
    assert [(seq, json.loads(frame)["text"]) for seq, frame in rows] == [
        (1, "one"),
        (2, "two"),
        (3, "three"),
    ]
