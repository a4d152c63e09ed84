"""Which database errors the event log rides out, an outage's grace and backoff, and the end of
an outage by an answer from the database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from parley.bus import InProcessBus
from parley.errors import Unavailable
from parley.observability import Metrics
from parley.protocol import AgentThinking
from parley.store.db import Database
from parley.store.eventlog import EventLog
from parley.store.outage import MAX_DELAY_S, Outage, is_transient
from tests.unit.conftest import Store

T = TypeVar("T")


class DriverError(Exception):
    """What SQLAlchemy's asyncpg adapter wraps: an error with its SQLSTATE."""

    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def wrapped(sqlstate: str | None) -> sa_exc.DBAPIError:
    return sa_exc.DBAPIError("COMMIT", None, DriverError(sqlstate))


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connection refused"),  # raised as is at connect
        TimeoutError(),
        sa_exc.OperationalError("COMMIT", None, DriverError(None)),  # e.g. SQLite locked
        sa_exc.InterfaceError("COMMIT", None, DriverError(None)),  # connection is closed
        wrapped("57P01"),  # terminating connection due to administrator command
        wrapped("57P03"),  # the database system is starting up
        wrapped("08006"),  # connection failure
        wrapped("40001"),  # serialization failure
    ],
)
def test_outages_are_transient(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        sa_exc.IntegrityError("INSERT", None, DriverError("23505")),
        wrapped("22021"),  # invalid byte sequence: the same data fails again
        wrapped("57014"),  # query cancelled: not an outage
        wrapped(None),
        ValueError("a bug"),
    ],
)
def test_refusals_and_bugs_are_not_transient(error: BaseException) -> None:
    assert not is_transient(error)


def test_a_dropped_connection_is_transient_whatever_its_class() -> None:
    error = wrapped(None)
    error.connection_invalidated = True
    assert is_transient(error)


def test_the_grace_counts_from_the_first_failure_and_the_backoff_is_capped() -> None:
    now = [100.0]
    outage = Outage(grace_s=10, clock=lambda: now[0])
    assert not outage.active
    outage.begin()
    now[0] += 6
    outage.begin()  # a later failure of the same outage does not restart the grace
    now[0] += 4.5
    assert outage.past_grace()
    delays = [outage.next_delay() for _ in range(8)]
    assert delays == sorted(delays)
    assert delays[-1] == MAX_DELAY_S
    assert outage.end() == pytest.approx(10.5)
    assert not outage.active
    assert not outage.past_grace()


class FailingFirst:
    """A real SQLite database whose first writes fail with the given errors, in order."""

    def __init__(self, db: Database, errors: list[Exception]) -> None:
        self._db = db
        self._errors = errors
        self.is_sqlite = db.is_sqlite

    async def run_write(self, work: Callable[[Connection], T]) -> T:
        if self._errors:
            raise self._errors.pop(0)
        return await self._db.run_write(work)


async def test_a_refusal_after_an_outage_ends_it_and_later_events_are_stored(
    store: Store,
) -> None:
    thread_id = store.thread_id
    locked = sa_exc.OperationalError("COMMIT", None, DriverError(None))  # transient
    refused = sa_exc.IntegrityError("INSERT", None, DriverError("23505"))  # not transient
    failing = FailingFirst(store.db, [locked, refused])
    log = EventLog(failing, InProcessBus(), Metrics(), outage_grace_s=0.2)  # type: ignore[arg-type]
    writer = asyncio.create_task(log.run())
    try:
        first = log.post("ada", AgentThinking(text="one", thread_id=thread_id, run_id="r1"))
        # Tried, held through the first (transient) failure, then refused by the database.
        with pytest.raises(Unavailable):
            await asyncio.wait_for(first, 10)
        await asyncio.sleep(0.3)  # past the grace: were the outage still on, events would be
        # refused at once without reaching the database
        second = log.post("ada", AgentThinking(text="two", thread_id=thread_id, run_id="r1"))
        await asyncio.wait_for(second, 10)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
