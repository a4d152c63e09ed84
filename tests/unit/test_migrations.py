"""The schema's migrations, on a store made by an older Parley."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import create_engine, inspect, text

from parley.store.db import _alembic_config


def test_0003_drops_the_events_run_index_and_keeps_the_events(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'store.db'}")
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), "0002")
    assert "ix_events_run_id" in {i["name"] for i in inspect(engine).get_indexes("events")}
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO users (id, created_at) VALUES ('u', '2026-12-03 19:00:00')")
        )
        connection.execute(
            text(
                "INSERT INTO threads (id, user_id, title, last_seq, created_at, updated_at) "
                "VALUES ('t', 'u', 'title', 1, '2026-12-03 19:00:00', '2026-12-03 19:00:00')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO events (id, thread_id, run_id, seq, type, frame, created_at) "
                "VALUES ('e', 't', 'r', 1, 'agent_started', '{}', '2026-12-03 19:00:00')"
            )
        )
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), "head")
    assert "ix_events_run_id" not in {i["name"] for i in inspect(engine).get_indexes("events")}
    with engine.connect() as connection:
        assert connection.execute(text("SELECT run_id, seq FROM events")).all() == [("r", 1)]
    with engine.begin() as connection:
        command.downgrade(_alembic_config(connection), "0002")
    assert "ix_events_run_id" in {i["name"] for i in inspect(engine).get_indexes("events")}
    engine.dispose()
