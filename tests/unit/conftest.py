"""Fixtures of the unit tests that use a real store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import Connection

from parley.store import queries
from parley.store.db import Database


@dataclass
class Store:
    """A migrated SQLite store with one user ("ada") and one thread of hers."""

    db: Database
    path: Path
    thread_id: str


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    path = tmp_path / "store.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.migrate()

    def new_thread(connection: Connection) -> str:
        queries.ensure_user(connection, user_id="ada")
        return queries.create_thread(connection, user_id="ada", title="t")

    store = Store(db, path, await db.run_write(new_thread))
    yield store
    await db.close()
