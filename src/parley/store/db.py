"""The database: engines, the one session factory for reads and one for writes, migrations.

SQLite (the embedded default) runs in WAL mode. Its write transactions start with
`BEGIN IMMEDIATE` on a separate writer engine: a deferred transaction that reads and then
writes fails at once with "database is locked" when another writer got in between, whereas
an immediate one simply waits for the lock (busy_timeout). PostgreSQL uses one engine for both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=10000",
    "PRAGMA foreign_keys=ON",
)


# Parley's transactions last milliseconds. One left open by a process that stopped (paused,
# hung, cut off) holds its row locks, e.g. on a thread's seq counter, and would block every
# other instance writing to that thread, including the peer ending the stopped instance's runs:
# PostgreSQL ends such a session after this long.
_POSTGRES_SETTINGS = {"idle_in_transaction_session_timeout": "5000"}


class Database:
    """Owns the engines. `read()` and `write()` each yield a session in one transaction;
    `read_connection()` and `write_connection()` a Core connection in one transaction."""

    def __init__(self, url: str):
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            # Enough pooled readers for a busy process: an overflow connection is opened (a new
            # aiosqlite thread) and closed for every read beyond the pool, which costs more than
            # the read itself.
            self._reader = create_async_engine(url, pool_size=32, max_overflow=32)
            self._writer = create_async_engine(url, pool_size=2, max_overflow=2)
            _configure_sqlite(self._reader, immediate=False)
            _configure_sqlite(self._writer, immediate=True)
        else:
            self._reader = create_async_engine(
                url,
                pool_size=10,
                max_overflow=20,
                pool_pre_ping=True,
                connect_args={"server_settings": _POSTGRES_SETTINGS},
            )
            self._writer = self._reader
        self._read_sessions = async_sessionmaker(self._reader, expire_on_commit=False)
        self._write_sessions = async_sessionmaker(self._writer, expire_on_commit=False)

    @property
    def sqlite_path(self) -> Path | None:
        if not self.is_sqlite or not self.url.database or self.url.database == ":memory:":
            return None
        return Path(self.url.database)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with self._read_sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        async with self._write_sessions() as session, session.begin():
            yield session

    # The hot path (the event log's writer, a run's reads) uses plain connections and Core
    # statements: an ORM session's unit of work, identity map and statement coercions cost more
    # CPU than the statements themselves (profiled in bench/README.md).
    @asynccontextmanager
    async def read_connection(self) -> AsyncIterator[AsyncConnection]:
        async with self._reader.begin() as connection:
            yield connection

    @asynccontextmanager
    async def write_connection(self) -> AsyncIterator[AsyncConnection]:
        async with self._writer.begin() as connection:
            yield connection

    async def ping(self) -> None:
        """A real round trip; raises when the database cannot answer."""
        async with self._reader.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        async with self._writer.begin() as connection:
            await connection.run_sync(_upgrade_to_head)

    async def current_revision(self) -> str | None:
        async with self._reader.connect() as connection:
            return await connection.run_sync(_current_revision)

    async def close(self) -> None:
        await self._reader.dispose()
        if self._writer is not self._reader:
            await self._writer.dispose()


def _configure_sqlite(engine: AsyncEngine, *, immediate: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below decide how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", "parley.store:migrations")
    config.attributes["connection"] = connection
    return config


def _upgrade_to_head(connection: Connection) -> None:
    command.upgrade(_alembic_config(connection), "head")


def _current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()
