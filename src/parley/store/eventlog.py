"""The event log: persists run events, gives each its per-thread `seq`, then delivers them.

Invariants:
- an event reaches the bus only after the transaction that stored it has committed, so whatever
  a client sees it can also get again by `resume`;
- a run's acceptance (the user message, the run row and its `agent_started`) is one transaction;
- a run's terminal event and its final status are one transaction too, written by a conditional
  update that succeeds for exactly one writer (the run's owner or any orphan sweep): a run never
  ends without its terminal event, and never gets two.

One writer task does all of it in batches (group commit): whatever is queued while a batch
commits goes into the next, in one transaction (store/batch.py): the batch's seqs taken for all
its threads at once and its events in multi-row inserts. Under load the writer spaces its
batches a little to gather more into each (store/group_commit.py). Publishing happens after the
commit and never waits on the network (see `EventBus.publish`), so a slow Redis cannot stall
the writes. Submitting is synchronous (`submit` returns a future): a run keeps reading its
model while the writer commits, and order is kept because there is one queue and one writer.

A database that goes away for a few seconds (a restart, a failover) does not fail the runs in
flight: the writer retries the batch's commit with backoff for `outage_grace_s` (see
`store/outage.py`) while new work queues up in memory, at most `backlog_limit` events. During
the outage a new message is refused at once (`unavailable`, its client retries). Past the grace
the events that were waiting fail with `StorageUnavailable`, so their runs end with
`agent_error storage_unavailable`; run ends (`Finish`) keep waiting, so that this terminal event
is stored as soon as the database is back. A commit whose acknowledgement is lost with the
connection is retried too: that rare case can store a batch twice.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

from parley.bus import Delivery, EventBus
from parley.errors import StorageUnavailable, Unavailable
from parley.observability import Metrics, get_logger
from parley.protocol import RunEvent
from parley.store.batch import Accepted, Finish, Intake, Work, persist_batch
from parley.store.db import Database
from parley.store.group_commit import CommitPacer
from parley.store.outage import Outage, is_transient

# The work items are part of the event log's interface.
__all__ = ["Accepted", "EventLog", "Finish", "Intake"]

log = get_logger(__name__)

E = TypeVar("E", bound=RunEvent)

MAX_BATCH = 1024


class EventLog:
    def __init__(
        self,
        db: Database,
        bus: EventBus,
        metrics: Metrics,
        *,
        outage_grace_s: float = 10.0,
        backlog_limit: int = 50_000,
        pacer: CommitPacer | None = None,
    ) -> None:
        self._db = db
        self._bus = bus
        self._metrics = metrics
        self._queue: asyncio.Queue[Work] = asyncio.Queue()
        self._closed = False
        self._outage = Outage(outage_grace_s)
        self._backlog_limit = backlog_limit
        self._retrying: list[Work] = []  # the batch waiting for the database, if any
        self._writing: asyncio.Future[None] | None = None  # the batch being written
        self._flushing = False
        self._pacer = pacer or CommitPacer()

    def submit(self, user_id: str, event: E) -> asyncio.Future[E]:
        """Queue `event` (thread_id and run_id set); the future gets it back stored, with seq
        and event id, once it is committed and published."""
        return self._enqueue(user_id, event)

    def post(self, user_id: str, event: RunEvent) -> asyncio.Future[None]:
        """`submit` for a submitter that only needs to know the event is stored: the future
        gets None once it is committed and published."""
        return self._enqueue(user_id, event, wants_event=False)

    async def append(self, user_id: str, event: E) -> E:
        """`submit` and wait for the event to be stored."""
        stored: E = await asyncio.shield(self.submit(user_id, event))
        return stored

    async def accept(self, intake: Intake) -> Accepted:
        """Store a user message, its run and `agent_started` in one transaction. Raises
        `NotFound` for a thread that is not the user's."""
        result: Accepted = await asyncio.shield(self._enqueue(intake.user_id, intake))
        return result

    async def finish(self, finish: Finish) -> RunEvent | None:
        """End the run with its terminal event if it is still running; returns the stored
        event, or None when the run had already ended (nothing is stored then)."""
        result: RunEvent | None = await asyncio.shield(self._enqueue(finish.user_id, finish))
        return result

    def _enqueue(
        self, user_id: str, item: Intake | Finish | RunEvent, *, wants_event: bool = True
    ) -> asyncio.Future[Any]:
        if self._closed:
            raise Unavailable("the event log is closed")
        work = Work(user_id, item, asyncio.get_running_loop().create_future(), wants_event)
        if self._outage.active and (refusal := self._outage_refusal(item)) is not None:
            work.done.set_exception(refusal)
            return work.done
        self._queue.put_nowait(work)
        return work.done

    def _outage_refusal(self, item: Intake | Finish | RunEvent) -> StorageUnavailable | None:
        """Why a run event cannot wait for the database any more, if it cannot. Messages and
        run ends always go to the writer (a message is the probe that ends an outage when no
        run is in flight; a run's end waits for the database)."""
        if isinstance(item, Intake | Finish):
            return None
        if self._outage.past_grace():
            self._metrics.eventlog_refused.labels(reason="grace").inc()
            return StorageUnavailable(
                f"the database has been unreachable for over {self._outage.grace_s:g}s"
            )
        if self._queue.qsize() + len(self._retrying) >= self._backlog_limit:
            self._metrics.eventlog_refused.labels(reason="backlog").inc()
            return StorageUnavailable("too many events are waiting for the database")
        return None

    # ------------------------------------------------------------------ the writer

    async def run(self) -> None:
        """The writer loop; runs until cancelled."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = [await self._queue.get()]
                try:
                    if wait := self._pacer.wait_before_batch(loop.time()):
                        await asyncio.sleep(wait)  # under load: gather more into one commit
                finally:
                    # A batch, once taken, is written to its end even if the writer is
                    # cancelled (at shutdown, here or below): its transaction may be committing
                    # in a database thread, and its events must still be published and its
                    # submitters answered.
                    self._take_queued(batch)
                    self._pacer.batch_taken(loop.time(), len(batch))
                    self._metrics.eventlog_queue_depth.set(self._queue.qsize())
                    self._writing = asyncio.ensure_future(self._write_batch(batch))
                await asyncio.shield(self._writing)
        finally:
            self._closed = True

    async def flush(self) -> None:
        """Write everything queued now (used at shutdown, after the writer task stopped)."""
        self._flushing = True  # past the grace, nothing waits for the database any more
        if self._writing is not None:
            await self._writing  # the batch under way when the writer stopped, to its end
        while not self._queue.empty():
            await self._write_batch(self._take_queued([]))

    def _take_queued(self, batch: list[Work]) -> list[Work]:
        """Fill `batch` with what is queued, in order, up to MAX_BATCH; returns it."""
        while len(batch) < MAX_BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _write_batch(self, batch: list[Work]) -> None:
        started = time.perf_counter()
        while True:
            try:
                results, stored = await self._persist(batch)
                break
            except Exception as exc:
                batch = await self._after_failure(batch, exc)
                if not batch:
                    return
                started = time.perf_counter()
        if self._outage.active:
            self._database_back()
        self._metrics.eventlog_batch_size.observe(len(batch))
        self._metrics.eventlog_commit_seconds.observe(time.perf_counter() - started)
        for work, result in zip(batch, results, strict=True):
            item = work.item
            if isinstance(item, Intake) and item.on_stored and isinstance(result, Accepted):
                _notify(functools.partial(item.on_stored, result), result.run_id)
            elif isinstance(item, Finish) and item.on_stored is not None:
                _notify(item.on_stored, item.event.run_id)
        self._bus.publish(stored)
        for work, result in zip(batch, results, strict=True):
            if work.done.done():
                continue  # the submitter gave up waiting (it was cancelled)
            if isinstance(result, BaseException):
                work.done.set_exception(result)
            else:
                work.done.set_result(result)

    # ------------------------------------------------------------------ database outages

    async def _after_failure(self, batch: list[Work], exc: Exception) -> list[Work]:
        """What to retry after a failed commit (after a backoff delay); empty when nothing."""
        if not is_transient(exc):
            log.exception("eventlog.write_failed", batch=len(batch))
            _fail(batch, Unavailable(f"could not persist event: {exc}"))
            if self._outage.active:
                # The database answered, if with a refusal: it is reachable again, and nothing
                # waits for it any more (else new events would be refused as in an outage).
                self._database_back()
            return []
        if not self._outage.active:
            self._outage.begin()
            self._metrics.database_outage.set(1)
            log.warning(
                "eventlog.database_unreachable; holding events",
                error=type(exc).__name__,
                grace_s=self._outage.grace_s,
            )
        self._metrics.eventlog_retries.inc()
        batch = self._sift(batch)
        self._retrying = batch
        self._metrics.eventlog_backlog.set(len(batch) + self._queue.qsize())
        if batch:
            await asyncio.sleep(self._outage.next_delay())
        return batch

    def _sift(self, batch: list[Work]) -> list[Work]:
        """Answer, from the batch and the queue, what must not wait for the database: new
        messages always, run events once the grace is spent (and at shutdown, run ends too).
        Returns the batch to retry; the rest of the queue keeps its order."""
        past_grace = self._outage.past_grace()
        queued: list[Work] = []
        while not self._queue.empty():
            queued.append(self._queue.get_nowait())
        keep: list[Work] = []
        for index, work in enumerate(batch + queued):
            if isinstance(work.item, Intake):
                _fail([work], Unavailable("the database is unavailable; retry"))
            elif past_grace and (self._flushing or not isinstance(work.item, Finish)):
                self._metrics.eventlog_refused.labels(reason="grace").inc()
                _fail([work], StorageUnavailable("the database stayed unreachable"))
            elif index < len(batch) or past_grace:
                keep.append(work)  # past the grace, waiting run ends join the retried batch
            else:
                self._queue.put_nowait(work)
        return keep

    def _database_back(self) -> None:
        lasted = self._outage.end()
        self._retrying = []
        self._metrics.database_outage.set(0)
        self._metrics.eventlog_backlog.set(0)
        log.info("eventlog.database_back", outage_s=round(lasted, 2))

    # ------------------------------------------------------------------ one transaction

    async def _persist(self, batch: list[Work]) -> tuple[list[Any], list[Delivery]]:
        """One transaction for the batch (see `batch.persist_batch`)."""
        fence = not self._db.is_sqlite  # SQLite has one instance: no peer ends its runs
        return await self._db.run_write(lambda connection: persist_batch(connection, batch, fence))


def _fail(works: list[Work], error: Exception) -> None:
    for work in works:
        if not work.done.done():
            work.done.set_exception(error)


def _notify(on_stored: Callable[[], None], run_id: str) -> None:
    """An `on_stored` callback (of an Intake or a Finish): its failure is logged, and the rest
    of the batch is still published and answered."""
    try:
        on_stored()
    except Exception:
        log.exception("eventlog.on_stored_failed", run_id=run_id)
