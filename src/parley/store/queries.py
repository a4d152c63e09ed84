"""Store functions: keyword-only arguments, one session in, rows out. They know nothing of HTTP
or WebSockets, and every read of user data is scoped by `user_id`.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from pydantic_core import from_json
from sqlalchemy import (
    Integer,
    Interval,
    String,
    bindparam,
    case,
    delete,
    exists,
    func,
    select,
    text,
    update,
)
from sqlalchemy import insert as insert_rows
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

from parley.store.models import Base, Event, Instance, Message, Run, Thread, utcnow
from parley.store.statements import HotStatement

THREAD_TITLE_CHARS = 80


# ---------------------------------------------------------------------------- the hot path
# What a run does on every message (the event log's writer, the run's own reads) is written as
# SQLAlchemy Core statements built once, here, and run as `HotStatement`s with bound parameters:
# building a statement per call (coercions, cache key), the ORM's unit of work and, on SQLite,
# SQLAlchemy's execution machinery cost several times the statement itself (see
# bench/README.md). These functions are synchronous: they run inside `Database.run_write` /
# `run_read`, a whole transaction at once.

USERS = Base.metadata.tables["users"]
THREADS = Base.metadata.tables["threads"]
MESSAGES = Base.metadata.tables["messages"]
RUNS = Base.metadata.tables["runs"]
EVENTS = Base.metadata.tables["events"]

_INSERT_USER = {
    "postgresql": HotStatement(
        pg_insert(USERS).on_conflict_do_nothing(), columns=["id", "created_at"]
    ),
    "sqlite": HotStatement(
        sqlite_insert(USERS).on_conflict_do_nothing(), columns=["id", "created_at"]
    ),
}
_INSERT_THREAD = HotStatement(
    insert_rows(THREADS),
    columns=["id", "user_id", "title", "last_seq", "created_at", "updated_at"],
)
_THREAD_OWNER = HotStatement(
    select(THREADS.c.user_id).where(THREADS.c.id == bindparam("thread_id"))
)
_INSERT_MESSAGE = HotStatement(
    insert_rows(MESSAGES),
    columns=[
        "id", "thread_id", "user_id", "role", "content", "client_message_id", "run_id",
        "created_at",
    ],
)  # fmt: skip
_INSERT_RUN = HotStatement(
    insert_rows(RUNS),
    columns=[
        "id", "thread_id", "user_id", "message_id", "agent", "status", "error_code",
        "input_tokens", "output_tokens", "instance_id", "started_at", "ended_at",
    ],
)  # fmt: skip
_INSERT_EVENTS = HotStatement(
    insert_rows(EVENTS),
    columns=["id", "thread_id", "run_id", "seq", "type", "frame", "created_at"],
)
_BY_CLIENT_ID = HotStatement(
    select(MESSAGES.c.id, MESSAGES.c.thread_id, MESSAGES.c.run_id).where(
        MESSAGES.c.user_id == bindparam("user_id"),
        MESSAGES.c.client_message_id == bindparam("client_message_id"),
    )
)
_RECENT_HISTORY = HotStatement(
    select(MESSAGES.c.id, MESSAGES.c.role, MESSAGES.c.content)
    .where(MESSAGES.c.thread_id == bindparam("thread_id"))
    .order_by(MESSAGES.c.created_at.desc())
    .limit(bindparam("limit"))
)
_END_RUN = HotStatement(
    update(RUNS)
    .where(RUNS.c.id == bindparam("run_id"), RUNS.c.status == "running")
    .values(
        status=bindparam("b_status"),
        error_code=bindparam("b_error_code"),
        input_tokens=bindparam("b_input_tokens"),
        output_tokens=bindparam("b_output_tokens"),
        ended_at=bindparam("b_ended_at"),
    )
)
_LOCK_THREADS = (
    select(THREADS.c.id)
    .where(THREADS.c.id.in_(bindparam("thread_ids", expanding=True)))
    .order_by(THREADS.c.id)
    # FOR NO KEY UPDATE: like the seq UPDATE that follows, it does not conflict with the
    # key-share locks that inserting a message or run of the thread takes (FOR UPDATE would,
    # and two instances taking intakes into one thread would deadlock).
    .with_for_update(key_share=True)
)
_RUNNING_AMONG = select(RUNS.c.id).where(
    RUNS.c.id.in_(bindparam("run_ids", expanding=True)), RUNS.c.status == "running"
)


def new_id() -> str:
    """A new id for a thread, message, run or event: see `new_ids`."""
    return new_ids(1)[0]


def new_ids(count: int) -> list[str]:
    """`count` new ids: UUIDs of version 7 (RFC 9562), the time in milliseconds followed by 74
    random bits, from one read of the system's randomness.

    Why time-ordered rather than wholly random (version 4): every id is a key of an index
    (events' primary key, threads', messages', ...), and a random key lands on a random page of
    it. Once the store holds more than fits in the cache, each streamed delta then touches a
    few cold pages: with 300,000 events stored, storing one cost ~134 µs with random ids and
    ~35 µs with time-ordered ones (`bench/bench_store.py`). New ids now go to the end of each
    index, where the pages are hot. The time they reveal is the creation time the frames
    already carry (`ts`)."""
    millis = f"{time.time_ns() // 1_000_000:012x}"
    randomness = os.urandom(10 * count).hex()
    ids = []
    for start in range(0, 20 * count, 20):
        r = randomness[start : start + 20]
        variant = "89ab"[int(r[3], 16) & 3]  # the variant's bits are 10xx
        h = f"{millis}7{r[:3]}{variant}{r[4:19]}"
        ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return ids


def ensure_user(connection: Connection, *, user_id: str) -> None:
    statement = _INSERT_USER.get(connection.dialect.name, _INSERT_USER["sqlite"])
    statement.run(connection, {"id": user_id, "created_at": utcnow()})


def create_thread(connection: Connection, *, user_id: str, title: str) -> str:
    thread_id = new_id()
    now = utcnow()
    row = {
        "id": thread_id,
        "user_id": user_id,
        "title": title[:THREAD_TITLE_CHARS],
        "last_seq": 0,
        "created_at": now,
        "updated_at": now,
    }
    _INSERT_THREAD.run(connection, row)
    return thread_id


def thread_owner(connection: Connection, *, thread_id: str) -> str | None:
    """The user the thread belongs to; None when there is no such thread."""
    rows = _THREAD_OWNER.rows(connection, {"thread_id": thread_id})
    return str(rows[0][0]) if rows else None


class StoredMessage(NamedTuple):
    id: str
    thread_id: str
    run_id: str | None


def find_by_client_id(
    connection: Connection, *, user_id: str, client_message_id: str
) -> StoredMessage | None:
    """The user's message with this client_message_id: its id, thread_id and run_id."""
    params = {"user_id": user_id, "client_message_id": client_message_id}
    rows = _BY_CLIENT_ID.rows(connection, params)
    return StoredMessage(*rows[0]) if rows else None


def add_message(
    connection: Connection,
    *,
    thread_id: str,
    user_id: str,
    role: str,
    content: str,
    run_id: str | None,
    client_message_id: str | None = None,
    message_id: str | None = None,
) -> str:
    message_id = message_id or new_id()
    row = {
        "id": message_id,
        "thread_id": thread_id,
        "user_id": user_id,
        "role": role,
        "content": content,
        "client_message_id": client_message_id,
        "run_id": run_id,
        "created_at": utcnow(),
    }
    _INSERT_MESSAGE.run(connection, row)
    return message_id


def create_run(
    connection: Connection,
    *,
    run_id: str,
    thread_id: str,
    user_id: str,
    message_id: str,
    agent: str,
    instance_id: str,
) -> None:
    row = {
        "id": run_id,
        "thread_id": thread_id,
        "user_id": user_id,
        "message_id": message_id,
        "agent": agent,
        "status": "running",
        "error_code": None,
        "input_tokens": 0,
        "output_tokens": 0,
        "instance_id": instance_id,
        "started_at": utcnow(),
        "ended_at": None,
    }
    _INSERT_RUN.run(connection, row)


def finish_run_if_running(
    connection: Connection,
    *,
    run_id: str,
    status: str,
    error_code: str | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
) -> bool:
    """End a run that is still `running`; False when it had already ended.

    The `status = 'running'` condition makes this the one place where a run ends: of any number
    of writers (the run's owner, orphan sweeps on several instances) exactly one succeeds, and
    only that one may store the run's terminal event (in the same transaction).
    """
    params = {
        "run_id": run_id,
        "b_status": status,
        "b_error_code": error_code,
        "b_input_tokens": input_tokens,
        "b_output_tokens": output_tokens,
        "b_ended_at": utcnow(),
    }
    return _END_RUN.run(connection, params) == 1


class HistoryEntry(NamedTuple):
    id: str
    role: str
    content: str


def recent_history(connection: Connection, *, thread_id: str, limit: int) -> list[HistoryEntry]:
    """The thread's newest `limit` messages, newest first: only the columns the model reads."""
    rows = _RECENT_HISTORY.rows(connection, {"thread_id": thread_id, "limit": limit})
    return [HistoryEntry(*row) for row in rows]


def insert_events(connection: Connection, rows: list[dict[str, object]]) -> None:
    _INSERT_EVENTS.many(connection, rows)


def reserve_seqs(connection: Connection, counts: dict[str, int]) -> dict[str, int]:
    """Take `counts[thread_id]` consecutive seqs of each thread; returns each thread's last seq
    taken. Row-locks the threads and marks them as updated now.

    One UPDATE for up to `RESERVE_CHUNK` threads rather than one per thread: on PostgreSQL a
    statement is a round trip, and on SQLite each statement lets go of the GIL and must win it
    back from the event loop, which holds it most of the time under load. Two writers cannot
    deadlock on it: `id IN (...)` on the primary key is an index scan that visits (and locks)
    the rows in key order whatever order the list is in, and the chunks go in key order too; a
    deadlock that did happen is a transient error the event log retries."""
    ordered = sorted(counts)
    taken: dict[str, int] = {}
    now = utcnow()
    sqlite = connection.dialect.name == "sqlite"
    for start in range(0, len(ordered), RESERVE_CHUNK):
        chunk = ordered[start : start + RESERVE_CHUNK]
        size = _reserve_size(len(chunk))
        if sqlite:
            taken.update(_reserve_on_sqlite(connection, chunk, counts, size, now))
            continue
        # Padded to the statement's size with the chunk's last thread: CASE takes the first
        # WHEN that matches, so a repeated thread adds nothing and is updated once.
        padded = chunk + [chunk[-1]] * (size - len(chunk))
        params: dict[str, object] = {"b_now": now}
        for index, thread_id in enumerate(padded):
            params[f"t{index}"] = thread_id
            params[f"c{index}"] = counts[thread_id]
        for thread_id, last_seq in _reserve_statement(size).rows(connection, params):
            taken[thread_id] = int(last_seq)
    if len(taken) != len(counts):
        raise LookupError(f"threads not found: {sorted(set(counts) - set(taken))}")
    return taken


def _reserve_on_sqlite(
    connection: Connection, chunk: list[str], counts: dict[str, int], size: int, now: datetime
) -> dict[str, int]:
    """SQLite's way to the same result, in two statements that step once each. The sqlite3
    driver lets go of the GIL on every step, and a statement returns one row per step: with
    `RETURNING` a batch of 40 threads won the GIL back from the event loop 41 times, each time
    at a cost to both threads, and the database thread spent a fifth more CPU per stored event
    at 200 streams (bench/README.md). So the counts are added without RETURNING, joined as a
    VALUES list (the CASE form is read WHEN by WHEN for every row, its cost growing with the
    square of the threads), and the new counters are read back as one JSON row."""
    # Padded with a thread id that no thread has (ids are never empty): it matches no row.
    padded = chunk + [""] * (size - len(chunk))
    params: dict[str, object] = {"b_now": now}
    for index, thread_id in enumerate(padded):
        params[f"t{index}"] = thread_id
        params[f"c{index}"] = counts.get(thread_id, 0)
    update_statement, read_statement = _reserve_sqlite_statements(size)
    update_statement.run(connection, params)
    ((listing,),) = read_statement.rows(connection, params)
    return {thread_id: int(last_seq) for thread_id, last_seq in from_json(listing)}


# Threads per seq-reserving statement: on SQLite two parameters each (and the time stamp), within
# its oldest limit of 999 parameters a statement.
RESERVE_CHUNK = 256


def _reserve_size(threads: int) -> int:
    """The statement size for `threads` threads: the next power of two, so that a handful of
    statements (compiled once each) serve every batch."""
    return 1 << (threads - 1).bit_length()


@functools.cache
def _reserve_statement(size: int) -> HotStatement:
    ids = [bindparam(f"t{i}", type_=String) for i in range(size)]
    added = case(
        *((THREADS.c.id == ids[i], bindparam(f"c{i}", type_=Integer)) for i in range(size))
    )
    return HotStatement(
        update(THREADS)
        .where(THREADS.c.id.in_(ids))
        .values(last_seq=THREADS.c.last_seq + added, updated_at=bindparam("b_now"))
        .returning(THREADS.c.id, THREADS.c.last_seq)
    )


@functools.cache
def _reserve_sqlite_statements(size: int) -> tuple[HotStatement, HotStatement]:
    ids = [f":t{i}" for i in range(size)]
    pairs = ", ".join(f"({thread_id}, :c{i})" for i, thread_id in enumerate(ids))
    counts = [bindparam(f"c{i}", type_=Integer) for i in range(size)]
    threads = [bindparam(f"t{i}", type_=String) for i in range(size)]
    update_counters = text(
        "UPDATE threads SET last_seq = threads.last_seq + counts.column2, updated_at = :b_now "
        f"FROM (VALUES {pairs}) AS counts WHERE threads.id = counts.column1"
    ).bindparams(bindparam("b_now", type_=THREADS.c.updated_at.type), *threads, *counts)
    read_counters = text(
        "SELECT json_group_array(json_array(id, last_seq)) FROM threads "
        f"WHERE id IN ({', '.join(ids)})"
    ).bindparams(*threads)
    return HotStatement(update_counters), HotStatement(read_counters)


def lock_threads(connection: Connection, *, thread_ids: Sequence[str]) -> None:
    """Row-lock the threads (in id order, so that two writers cannot deadlock) until the end of
    the transaction: whoever stores events of these threads waits for us, or we for them."""
    connection.execute(_LOCK_THREADS, {"thread_ids": sorted(thread_ids)})


def running_among(connection: Connection, *, run_ids: set[str]) -> set[str]:
    """Which of `run_ids` are still running."""
    result = connection.execute(_RUNNING_AMONG, {"run_ids": list(run_ids)})
    return set(result.scalars().all())


# ---------------------------------------------------------------------------- other reads


async def get_thread(session: AsyncSession, *, user_id: str, thread_id: str) -> Thread | None:
    """The thread if it belongs to `user_id`; else None, whether it exists for someone else
    or not at all."""
    thread = await session.get(Thread, thread_id)
    if thread is None or thread.user_id != user_id:
        return None
    return thread


async def list_threads(
    session: AsyncSession, *, user_id: str, limit: int = 100
) -> Sequence[Thread]:
    statement = (
        select(Thread)
        .where(Thread.user_id == user_id)
        .order_by(Thread.updated_at.desc())
        .limit(limit)
    )
    return (await session.scalars(statement)).all()


async def list_messages(
    session: AsyncSession, *, thread_id: str, limit: int | None = None
) -> Sequence[Message]:
    statement = (
        select(Message).where(Message.thread_id == thread_id).order_by(Message.created_at.asc())
    )
    if limit is not None:
        statement = statement.limit(limit)
    return (await session.scalars(statement)).all()


async def search_messages(
    session: AsyncSession, *, user_id: str, query: str, limit: int = 10
) -> Sequence[Message]:
    pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    statement = (
        select(Message)
        .where(
            Message.user_id == user_id,
            Message.role == "user",
            Message.content.ilike(pattern, escape="\\"),
        )
        .order_by(Message.created_at.desc())
        .limit(limit)
    )
    return (await session.scalars(statement)).all()


async def get_run(session: AsyncSession, *, user_id: str, run_id: str) -> Run | None:
    """The run if it belongs to `user_id`; else None, like `get_thread`."""
    run = await session.get(Run, run_id)
    if run is None or run.user_id != user_id:
        return None
    return run


async def running_runs(
    session: AsyncSession, *, started_before: datetime | None = None, instance_id: str | None = None
) -> Sequence[Run]:
    statement = select(Run).where(Run.status == "running")
    if started_before is not None:
        statement = statement.where(Run.started_at < started_before)
    if instance_id is not None:
        statement = statement.where(Run.instance_id == instance_id)
    return (await session.scalars(statement)).all()


# ---------------------------------------------------------------------------- instance leases
# Every time here is the database's own clock (`now()`), never a process's: instances on
# different machines compare heartbeats without trusting each other's clocks.


async def register_instance(session: AsyncSession, *, instance_id: str) -> None:
    """Add this instance with a fresh lease."""
    await session.execute(
        insert_rows(Instance).values(
            id=instance_id, started_at=func.now(), heartbeat_at=func.now(), dead=False
        )
    )


async def renew_instance(session: AsyncSession, *, instance_id: str) -> bool:
    """Renew the instance's lease; False when it was declared dead (or its row is gone). A
    late renewal of a lease nobody declared dead still counts: the instance was only slow (or
    the database away), and nobody has taken its runs."""
    result = await session.execute(
        update(Instance)
        .where(Instance.id == instance_id, Instance.dead.is_(False))
        .values(heartbeat_at=func.now())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def declare_dead(session: AsyncSession, *, lease: timedelta, except_id: str) -> Sequence[str]:
    """Declare every instance whose heartbeat is older than `lease` dead (but `except_id`);
    returns those this call declared. Conditional, so that of any number of sweepers one
    declares each, and a renewal that commits first keeps the instance alive."""
    oldest_alive = func.now() - bindparam("lease", lease, type_=Interval())
    statement = (
        update(Instance)
        .where(
            Instance.dead.is_(False),
            Instance.heartbeat_at < oldest_alive,
            Instance.id != except_id,
        )
        .values(dead=True)
        .returning(Instance.id)
        .execution_options(synchronize_session=False)
    )
    return (await session.scalars(statement)).all()


async def give_up_instance(session: AsyncSession, *, instance_id: str) -> None:
    """Declare this instance dead itself (a clean shutdown): peers forget it at their next
    sweep, ending at once any run it left running."""
    await session.execute(
        update(Instance)
        .where(Instance.id == instance_id)
        .values(dead=True)
        .execution_options(synchronize_session=False)
    )


async def dead_instances(session: AsyncSession) -> Sequence[str]:
    """Instances declared dead and not forgotten yet (their runs may still be running)."""
    return (await session.scalars(select(Instance.id).where(Instance.dead.is_(True)))).all()


async def forget_instance(session: AsyncSession, *, instance_id: str) -> bool:
    """Delete a dead instance that has no running run left; False when it still has one (a
    later sweep ends it, then forgets the instance)."""
    has_running_run = exists().where(Run.instance_id == instance_id, Run.status == "running")
    result = await session.execute(
        delete(Instance)
        .where(Instance.id == instance_id, Instance.dead.is_(True), ~has_running_run)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def events_after(
    session: AsyncSession, *, thread_id: str, after_seq: int, limit: int = 500
) -> Sequence[Event]:
    statement = (
        select(Event)
        .where(Event.thread_id == thread_id, Event.seq > after_seq)
        .order_by(Event.seq)
        .limit(limit)
    )
    return (await session.scalars(statement)).all()
