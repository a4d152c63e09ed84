"""The database: engines, the one session factory for reads and one for writes, migrations.

SQLite (the embedded default) runs in WAL mode. Its write transactions start with
`BEGIN IMMEDIATE` on a separate writer engine: a deferred transaction that reads and then
writes fails at once with "database is locked" when another writer got in between, whereas
an immediate one simply waits for the lock (busy_timeout). PostgreSQL uses one engine for both.

The hot path (the event log's group commit, a run's reads) hands a whole transaction to
`run_write` / `run_read` as one synchronous function of a Core connection. On PostgreSQL it
runs on the async engine (`run_sync`). On SQLite it runs whole in a database thread, on a
synchronous engine: the asyncio driver (aiosqlite) hops to its thread and back once per
statement, and a batch is a dozen statements, each hop waking the event loop and contending
for the GIL (measured in bench/README.md). One thread does every write, in order, which is
also how SQLite wants its writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from parley.observability import get_logger

_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=10000",
    "PRAGMA foreign_keys=ON",
    # Checkpoints are the checkpointer's (`Database.checkpoint_forever`), not a commit's.
    "PRAGMA wal_autocheckpoint=0",
    # A WAL that grew in a burst is cut back to this when it starts over.
    "PRAGMA journal_size_limit=67108864",
)
CHECKPOINT_INTERVAL_S = 1.0


# Parley's transactions last milliseconds. One left open by a process that stopped (paused,
# hung, cut off) holds its row locks, e.g. on a thread's seq counter, and would block every
# other instance writing to that thread, including the peer ending the stopped instance's runs:
# PostgreSQL ends such a session after this long.
_POSTGRES_SETTINGS = {"idle_in_transaction_session_timeout": "5000"}

# Threads (and pooled connections) for SQLite's synchronous reads on the hot path.
_SQLITE_READ_THREADS = 4

T = TypeVar("T")
log = get_logger(__name__)


class Database:
    """Owns the engines. `read()` and `write()` each yield a session in one transaction;
    `run_read()` and `run_write()` run a function of a Core connection in one transaction."""

    def __init__(self, url: str):
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            # Enough pooled readers for a busy process: an overflow connection is opened (a new
            # aiosqlite thread) and closed for every read beyond the pool, which costs more than
            # the read itself.
            self._reader = create_async_engine(url, pool_size=32, max_overflow=32)
            self._writer = create_async_engine(url, pool_size=2, max_overflow=2)
            _configure_sqlite(self._reader.sync_engine, immediate=False)
            _configure_sqlite(self._writer.sync_engine, immediate=True)
            sync_url = self.url.set(drivername="sqlite")
            # No rollback when a connection goes back to the pool: `_in_thread` always ends its
            # transaction (commit, or rollback on error), and the extra rollback cost about a
            # third of a short transaction.
            self._sync_reader: Engine | None = create_engine(
                sync_url,
                pool_size=_SQLITE_READ_THREADS,
                max_overflow=0,
                pool_reset_on_return=None,
            )
            self._sync_writer: Engine | None = create_engine(
                sync_url, pool_size=1, max_overflow=0, pool_reset_on_return=None
            )
            _configure_sqlite(self._sync_reader, immediate=False)
            _configure_sqlite(self._sync_writer, immediate=True)
            self._read_threads: ThreadPoolExecutor | None = ThreadPoolExecutor(
                _SQLITE_READ_THREADS, thread_name_prefix="sqlite-read"
            )
            self._write_thread: ThreadPoolExecutor | None = ThreadPoolExecutor(
                1, thread_name_prefix="sqlite-write"
            )
        else:
            self._reader = create_async_engine(
                url,
                pool_size=10,
                max_overflow=20,
                pool_pre_ping=True,
                connect_args={"server_settings": _POSTGRES_SETTINGS},
            )
            self._writer = self._reader
            self._sync_reader = self._sync_writer = None
            self._read_threads = self._write_thread = None
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

    async def run_read(self, work: Callable[[Connection], T]) -> T:
        """`work(connection)` in one read transaction (see the module's docstring)."""
        if self._sync_reader is not None:
            return await _in_thread(self._read_threads, self._sync_reader, work)
        async with self._reader.begin() as connection:
            return await connection.run_sync(work)

    async def run_write(self, work: Callable[[Connection], T]) -> T:
        """`work(connection)` in one write transaction, committed when it returns and rolled
        back when it raises (see the module's docstring)."""
        if self._sync_writer is not None:
            return await _in_thread(self._write_thread, self._sync_writer, work)
        async with self._writer.begin() as connection:
            return await connection.run_sync(work)

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

    async def checkpoint_forever(self, interval_s: float = CHECKPOINT_INTERVAL_S) -> None:
        """SQLite only: copy what the WAL holds back into the database file every `interval_s`,
        in a reader thread. Left to SQLite, the commit that grows the WAL past 1,000 pages does
        it, in the writer thread: 30-100 ms of writing and syncing the file during which no
        event of any run is stored or sent, a stall every client sees (bench/README.md). A
        passive checkpoint waits for no reader or writer."""
        if self._sync_reader is None:
            return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            try:
                # Most of the copying beside the writer, then what came in meanwhile between
                # two of the writer's transactions: there the checkpoint completes, and the
                # next transaction starts the WAL over (beside a busy writer a checkpoint never
                # catches up, and the WAL would grow for as long as the load lasts).
                await loop.run_in_executor(self._read_threads, self._checkpoint)
                await loop.run_in_executor(self._write_thread, self._checkpoint)
            except Exception:
                log.exception("database.checkpoint_failed")

    def _checkpoint(self) -> None:
        assert self._sync_reader is not None
        # The driver's connection, in autocommit: a checkpoint runs outside any transaction.
        connection = self._sync_reader.raw_connection()
        try:
            connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").close()  # type: ignore[union-attr]
        finally:
            connection.close()

    async def close(self) -> None:
        await self._reader.dispose()
        if self._writer is not self._reader:
            await self._writer.dispose()
        for threads in (self._read_threads, self._write_thread):
            if threads is not None:
                threads.shutdown(wait=True)
        for engine in (self._sync_reader, self._sync_writer):
            if engine is not None:
                engine.dispose()


async def _in_thread(
    threads: ThreadPoolExecutor | None, engine: Engine, work: Callable[[Connection], T]
) -> T:
    """Run `work` in one transaction of `engine`, in one of `threads`. Once started, the
    transaction runs to its end (commit or rollback) even if the awaiting task is cancelled:
    a thread cannot be interrupted, and the caller owns what a cancelled write did."""

    def transaction() -> T:
        with engine.begin() as connection:
            return work(connection)

    return await asyncio.get_running_loop().run_in_executor(threads, transaction)


def _configure_sqlite(engine: Engine, *, immediate: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below decide how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine, "begin")
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
