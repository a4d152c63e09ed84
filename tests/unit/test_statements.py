"""HotStatement on SQLite: the driver's connection directly, with SQLAlchemy's conversions and
error types, so the rest of the store cannot tell it from a SQLAlchemy execution."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, insert, select, text
from sqlalchemy.exc import IntegrityError

from parley.store import queries
from parley.store.db import _configure_sqlite as configure_sqlite
from parley.store.models import Base
from parley.store.statements import HotStatement


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """Set up as the event log's writer engine is (store/db.py): the driver in autocommit, and
    transactions begun by SQLAlchemy with BEGIN IMMEDIATE."""
    engine = create_engine(f"sqlite:///{tmp_path / 'store.db'}", pool_reset_on_return=None)
    configure_sqlite(engine, immediate=True)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_values_are_stored_exactly_as_sqlalchemy_stores_them(engine: Engine) -> None:
    moment = datetime(2026, 12, 3, 14, 5, 6, 789012, tzinfo=UTC)
    hot = HotStatement(insert(queries.USERS), columns=["id", "created_at"])
    with engine.begin() as connection:
        hot.run(connection, {"id": "hot", "created_at": moment})
        connection.execute(insert(queries.USERS), {"id": "plain", "created_at": moment})
    with engine.connect() as connection:
        stored = dict(connection.execute(text("SELECT id, created_at FROM users")).all())
        read_back = connection.execute(select(queries.USERS.c.created_at)).scalars().all()
    assert stored["hot"] == stored["plain"]
    assert read_back[0] == read_back[1]


def test_a_literal_in_the_statement_is_bound_and_rows_come_back_by_position(
    engine: Engine,
) -> None:
    with engine.begin() as connection:
        queries.ensure_user(connection, user_id="u")
        thread = queries.create_thread(connection, user_id="u", title="t")
        for run_id in ("r1", "r2"):
            message = queries.add_message(
                connection, thread_id=thread, user_id="u", role="user", content="hi", run_id=None
            )
            queries.create_run(
                connection,
                run_id=run_id,
                thread_id=thread,
                user_id="u",
                message_id=message,
                agent="assistant",
                instance_id="i",
            )
        # `status = 'running'` is part of the statement, not of the parameters.
        assert queries.finish_run_if_running(connection, run_id="r1", status="completed")
        assert not queries.finish_run_if_running(connection, run_id="r1", status="failed")
        assert queries.reserve_seqs(connection, {thread: 3}) == {thread: 3}
        assert queries.reserve_seqs(connection, {thread: 2}) == {thread: 5}
        assert queries.thread_owner(connection, thread_id=thread) == "u"
        assert queries.thread_owner(connection, thread_id="nobody's") is None
        history = queries.recent_history(connection, thread_id=thread, limit=1)
    assert [(entry.role, entry.content) for entry in history] == [("user", "hi")]


def test_driver_errors_are_raised_as_sqlalchemys(engine: Engine) -> None:
    hot = HotStatement(insert(queries.USERS), columns=["id", "created_at"])
    with engine.begin() as connection:
        hot.run(connection, {"id": "twice", "created_at": datetime.now(UTC)})
        with pytest.raises(IntegrityError):
            hot.run(connection, {"id": "twice", "created_at": datetime.now(UTC)})


def test_seqs_of_many_threads_are_taken_in_a_few_statements_and_rows_inserted_in_groups(
    engine: Engine,
) -> None:
    with engine.begin() as connection:
        queries.ensure_user(connection, user_id="u")
        threads = [queries.create_thread(connection, user_id="u", title="t") for _ in range(300)]
        # 300 threads: two chunks (256 + 44, the second padded to 64); counts differ per thread.
        counts = {thread: 1 + i % 3 for i, thread in enumerate(threads)}
        assert queries.reserve_seqs(connection, counts) == counts
        again = queries.reserve_seqs(connection, {threads[0]: 5, threads[299]: 1})
        assert again == {threads[0]: counts[threads[0]] + 5, threads[299]: counts[threads[299]] + 1}
        with pytest.raises(LookupError):
            queries.reserve_seqs(connection, {threads[1]: 1, "no such thread": 1})
        # Taking seqs marks a thread as updated (the threads list is ordered by it), stored as
        # SQLAlchemy stores a time stamp (the text form the order relies on): it reads back as
        # the moment it was taken.
        before = datetime.now(UTC)
        queries.reserve_seqs(connection, {threads[7]: 1})
        updated = connection.execute(
            select(queries.THREADS.c.updated_at).where(queries.THREADS.c.id == threads[7])
        ).scalar_one()
        assert before <= updated.replace(tzinfo=UTC) <= datetime.now(UTC)
        stored = connection.execute(
            text("SELECT updated_at FROM threads WHERE id = :id"), {"id": threads[7]}
        ).scalar_one()
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", stored), stored
    shared = datetime(2026, 12, 3, 17, 0, 0, 123456, tzinfo=UTC)
    rows: list[dict[str, object]] = [
        {
            "id": f"e{i}",
            "thread_id": threads[i % 300],
            "run_id": "r",
            "seq": 1000 + i,
            "type": "agent_message_delta",
            "frame": "{}",
            # Half the rows share one time stamp object (converted once), half have their own.
            "created_at": shared if i % 2 else shared + timedelta(seconds=i),
        }
        for i in range(333)  # groups of 128, 128, 64, 8, 4 and 1 rows
    ]
    with engine.begin() as connection:
        queries.insert_events(connection, rows)
        stored = connection.execute(text("SELECT id, seq FROM events ORDER BY seq")).all()
        moments = connection.execute(
            select(queries.EVENTS.c.created_at).order_by(queries.EVENTS.c.seq)
        ).scalars()
        assert [m.replace(tzinfo=UTC) for m in moments] == [r["created_at"] for r in rows]
    assert [(row.id, row.seq) for row in stored] == [(r["id"], r["seq"]) for r in rows]


def test_a_hot_statement_is_part_of_the_sqlalchemy_transaction_it_runs_in(engine: Engine) -> None:
    hot = HotStatement(insert(queries.USERS), columns=["id", "created_at"])

    def failing_batch() -> None:
        with engine.begin() as connection:
            hot.run(connection, {"id": "rolled back", "created_at": datetime.now(UTC)})
            raise RuntimeError("the batch failed after this statement")

    with pytest.raises(RuntimeError):
        failing_batch()
    with engine.begin() as connection:
        hot.run(connection, {"id": "committed", "created_at": datetime.now(UTC)})
    with engine.connect() as connection:
        ids = connection.execute(select(queries.USERS.c.id)).scalars().all()
    assert ids == ["committed"]
