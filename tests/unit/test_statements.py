"""HotStatement on SQLite: the driver's connection directly, with SQLAlchemy's conversions and
error types, so the rest of the store cannot tell it from a SQLAlchemy execution."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, insert, select, text
from sqlalchemy.exc import IntegrityError

from parley.store import queries
from parley.store.models import Base
from parley.store.statements import HotStatement


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'store.db'}")
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
