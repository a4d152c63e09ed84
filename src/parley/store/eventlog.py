"""The event log: persists run events, gives each its per-thread `seq`, then delivers them.

Invariants:
- an event reaches the bus only after the transaction that stored it has committed, so whatever
  a client sees it can also get again by `resume`;
- a run's acceptance (the user message, the run row and its `agent_started`) is one transaction;
- a run's terminal event and its final status are one transaction too, written by a conditional
  update that succeeds for exactly one writer (the run's owner or any orphan sweep): a run never
  ends without its terminal event, and never gets two.

One writer task does all of it in batches (group commit): whatever is queued while a batch
commits goes into the next, in one transaction: the batch's seqs taken for all its threads at
once (`queries.reserve_seqs`) and its events in multi-row inserts. Publishing happens after the
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
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from parley.bus import Delivery, EventBus
from parley.errors import NotFound, StorageUnavailable, Unavailable
from parley.observability import Metrics, get_logger
from parley.protocol import AgentStarted, RunEvent, TerminalEvent, Usage
from parley.store import queries
from parley.store.db import Database
from parley.store.group_commit import CommitPacer
from parley.store.models import utcnow
from parley.store.outage import Outage, is_transient

log = get_logger(__name__)

E = TypeVar("E", bound=RunEvent)

MAX_BATCH = 1024


# ---------------------------------------------------------------------------- the work


@dataclass(frozen=True)
class Accepted:
    """What `message_accepted` tells the client; `duplicate` when the client_message_id had
    already been accepted (then nothing new was stored)."""

    client_message_id: str | None
    thread_id: str
    message_id: str
    run_id: str
    duplicate: bool


@dataclass(frozen=True)
class Intake:
    """A user message to accept: stored with its run and the run's `agent_started`."""

    user_id: str
    content: str
    thread_id: str | None
    client_message_id: str | None
    agent: str
    instance_id: str
    run_id: str = field(default_factory=queries.new_id)
    message_id: str = field(default_factory=queries.new_id)
    # Called by the writer right after the commit and before the run's `agent_started` is
    # published: whoever is told of the acceptance here (the supervisor registers the run, the
    # connection queues `message_accepted`) is told before any event of the run exists for
    # anyone, so `message_accepted` precedes the run's events and a `stop_agent` sent on
    # receiving it always finds the run.
    on_stored: Callable[[Accepted], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Finish:
    """A run's end: its terminal event, final status and (when it completed) its answer."""

    user_id: str
    event: TerminalEvent
    status: str  # completed | error | cancelled
    error_code: str | None = None
    usage: Usage | None = None
    answer: str | None = None  # stored as the assistant message, id `event.message_id`
    # Called by the writer right after the commit and before the terminal event is published,
    # as `Intake.on_stored`: whatever a client may do on seeing the run end (start the next
    # run, within its per-user limit) finds the run's place already free.
    on_stored: Callable[[], None] | None = field(default=None, compare=False)


@dataclass
class _Work:
    user_id: str
    item: Intake | Finish | RunEvent
    done: asyncio.Future[Any]
    # Whether the submitter reads the stored event back (with its seq and id): streamed text
    # and progress notes are only waited for, and copying a frozen event costs more than
    # storing it.
    wants_event: bool = True


# ---------------------------------------------------------------------------- the log


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
        self._queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._closed = False
        self._outage = Outage(outage_grace_s)
        self._backlog_limit = backlog_limit
        self._retrying: list[_Work] = []  # the batch waiting for the database, if any
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
        work = _Work(user_id, item, asyncio.get_running_loop().create_future(), wants_event)
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
                    while len(batch) < MAX_BATCH and not self._queue.empty():
                        batch.append(self._queue.get_nowait())
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
            batch: list[_Work] = []
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write_batch(batch)

    async def _write_batch(self, batch: list[_Work]) -> None:
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

    async def _after_failure(self, batch: list[_Work], exc: Exception) -> list[_Work]:
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

    def _sift(self, batch: list[_Work]) -> list[_Work]:
        """Answer, from the batch and the queue, what must not wait for the database: new
        messages always, run events once the grace is spent (and at shutdown, run ends too).
        Returns the batch to retry; the rest of the queue keeps its order."""
        past_grace = self._outage.past_grace()
        queued: list[_Work] = []
        while not self._queue.empty():
            queued.append(self._queue.get_nowait())
        keep: list[_Work] = []
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

    async def _persist(self, batch: list[_Work]) -> tuple[list[Any], list[Delivery]]:
        """One transaction for the batch (see `_persist_batch`)."""
        fence = not self._db.is_sqlite  # SQLite has one instance: no peer ends its runs
        return await self._db.run_write(lambda connection: _persist_batch(connection, batch, fence))


def _fail(works: list[_Work], error: Exception) -> None:
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


# ---------------------------------------------------------------------------- one transaction
# Synchronous: a batch's transaction runs whole inside `Database.run_write` (on SQLite in the
# database thread), so nothing here may touch the event loop (the works' futures included).


def _persist_batch(
    connection: Connection, batch: list[_Work], fence: bool
) -> tuple[list[Any], list[Delivery]]:
    """Store the batch. Returns each work's result (in order) and the stored events to deliver
    (in seq order per thread)."""
    results: list[Any] = []
    to_store: list[tuple[_Work, RunEvent]] = []
    for work in batch:
        item = work.item
        if isinstance(item, Intake):
            accepted, started = _accept(connection, item)
            results.append(accepted)
            if started is not None:
                to_store.append((work, started))
        elif isinstance(item, Finish):
            ended = _finish(connection, item)
            results.append(None)
            if ended:
                to_store.append((work, item.event))
        else:
            results.append(None)
            to_store.append((work, item))
    if fence:
        to_store = _fence(connection, batch, results, to_store)
    envelopes = _insert_events(connection, [event for _, event in to_store])
    wanted: dict[int, RunEvent] = {}
    deliveries: list[Delivery] = []
    for (work, event), (seq, event_id, frame) in zip(to_store, envelopes, strict=True):
        deliveries.append(Delivery(work.user_id, event.thread_id, seq, frame))
        if work.wants_event and not isinstance(work.item, Intake):
            wanted[id(work)] = event.model_copy(update={"seq": seq, "event_id": event_id})
    for index, work in enumerate(batch):
        if not isinstance(results[index], Accepted | BaseException) and id(work) in wanted:
            results[index] = wanted[id(work)]
    return results, deliveries


def _fence(
    connection: Connection,
    batch: list[_Work],
    results: list[Any],
    to_store: list[tuple[_Work, RunEvent]],
) -> list[tuple[_Work, RunEvent]]:
    """Drop the progress events of runs that have ended: an instance paused past its lease
    may still hold events of runs that a peer has ended since (see supervisor/leases.py), and
    they must not follow the terminal event. The threads are locked first: a peer's terminal
    event either committed before our check (we see the run ended) or waits for our commit
    (and gets a later seq)."""
    progress = {e.run_id for _, e in to_store if not isinstance(e, TerminalEvent | AgentStarted)}
    if not progress:
        return to_store
    queries.lock_threads(connection, thread_ids=list({e.thread_id for _, e in to_store}))
    # Runs that ended in this very transaction (their own Finish won) keep their events.
    ended_here = {e.run_id for _, e in to_store if isinstance(e, TerminalEvent)}
    live = queries.running_among(connection, run_ids=progress) | ended_here
    kept = []
    for work, event in to_store:
        if isinstance(event, TerminalEvent | AgentStarted) or event.run_id in live:
            kept.append((work, event))
        else:
            results[batch.index(work)] = NotFound(f"run {event.run_id} has already ended")
    return kept


# ---------------------------------------------------------------------------- store steps


def _accept(
    connection: Connection, intake: Intake
) -> tuple[Accepted | BaseException, AgentStarted | None]:
    """The intake's rows, or the reason it was refused (returned, so the rest of the batch
    still commits). A duplicate client_message_id answers with what was accepted before."""
    if intake.client_message_id is not None:
        previous = _previous(connection, intake)
        if previous is not None:
            return previous, None
    try:
        if intake.client_message_id is None:
            thread_id = _intake_rows(connection, intake)
        else:
            # A savepoint: a client_message_id racing in from another instance fails only this
            # one. (Without a client_message_id no row can conflict, and a savepoint costs two
            # statements.) A thread that is not the user's is found before any row is written.
            with connection.begin_nested():
                thread_id = _intake_rows(connection, intake)
    except NotFound as exc:
        return exc, None
    except IntegrityError:
        previous = _previous(connection, intake)
        if previous is None:
            raise
        return previous, None
    accepted = Accepted(
        intake.client_message_id, thread_id, intake.message_id, intake.run_id, duplicate=False
    )
    started = AgentStarted(
        agent=intake.agent, message_id=intake.message_id, thread_id=thread_id, run_id=intake.run_id
    )
    return accepted, started


def _previous(connection: Connection, intake: Intake) -> Accepted | None:
    assert intake.client_message_id is not None
    found = queries.find_by_client_id(
        connection, user_id=intake.user_id, client_message_id=intake.client_message_id
    )
    if found is None or found.run_id is None:
        return None
    return Accepted(
        intake.client_message_id, found.thread_id, found.id, found.run_id, duplicate=True
    )


def _intake_rows(connection: Connection, intake: Intake) -> str:
    if intake.thread_id is None:
        queries.ensure_user(connection, user_id=intake.user_id)
        thread_id = queries.create_thread(connection, user_id=intake.user_id, title=intake.content)
    else:
        # An existing thread of the user's: the user row exists too.
        owner = queries.thread_owner(connection, thread_id=intake.thread_id)
        if owner != intake.user_id:  # someone else's or none: the same answer
            raise NotFound(f"thread {intake.thread_id} not found")
        thread_id = intake.thread_id
    queries.add_message(
        connection,
        thread_id=thread_id,
        user_id=intake.user_id,
        role="user",
        content=intake.content,
        client_message_id=intake.client_message_id,
        run_id=intake.run_id,
        message_id=intake.message_id,
    )
    queries.create_run(
        connection,
        run_id=intake.run_id,
        thread_id=thread_id,
        user_id=intake.user_id,
        message_id=intake.message_id,
        agent=intake.agent,
        instance_id=intake.instance_id,
    )
    return thread_id


def _finish(connection: Connection, finish: Finish) -> bool:
    usage = finish.usage or Usage()
    ended = queries.finish_run_if_running(
        connection,
        run_id=finish.event.run_id,
        status=finish.status,
        error_code=finish.error_code,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
    )
    if ended and finish.answer is not None:
        message_id = getattr(finish.event, "message_id", None) or queries.new_id()
        queries.add_message(
            connection,
            thread_id=finish.event.thread_id,
            user_id=finish.user_id,
            role="assistant",
            content=finish.answer,
            run_id=finish.event.run_id,
            message_id=message_id,
        )
    return ended


def _insert_events(connection: Connection, events: list[RunEvent]) -> list[tuple[int, str, str]]:
    """Give each event its seq and id and insert them; returns each one's seq, id and frame."""
    if not events:
        return []
    counts: dict[str, int] = {}
    for event in events:
        counts[event.thread_id] = counts.get(event.thread_id, 0) + 1
    last = queries.reserve_seqs(connection, counts)
    next_seq = {thread_id: last[thread_id] - count + 1 for thread_id, count in counts.items()}
    envelopes: list[tuple[int, str, str]] = []
    rows: list[dict[str, object]] = []
    now = utcnow()
    for event, event_id in zip(events, queries.new_ids(len(events)), strict=True):
        seq = next_seq[event.thread_id]
        next_seq[event.thread_id] = seq + 1
        frame = event.to_json_stored(seq, event_id)
        envelopes.append((seq, event_id, frame))
        rows.append(
            {
                "id": event_id,
                "thread_id": event.thread_id,
                "run_id": event.run_id,
                "seq": seq,
                "type": event.type,
                "frame": frame,
                "created_at": now,
            }
        )
    queries.insert_events(connection, rows)
    return envelopes
