"""The event log: persists run events, gives each its per-thread `seq`, then delivers them.

Invariant: an event reaches the bus only after the transaction that stored it has committed,
so whatever a client sees it can also get again by `resume`.

Appends from all concurrent runs are written by one writer task in batches (group commit):
one transaction per batch, one `UPDATE threads ... RETURNING last_seq` per thread in it, one
multi-row insert. Under load that is a handful of round trips for hundreds of events.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy import insert

from parley.bus import Delivery, EventBus
from parley.errors import Unavailable
from parley.observability import Metrics, get_logger
from parley.protocol import RunEvent
from parley.store import queries
from parley.store.db import Database
from parley.store.models import Event, utcnow

log = get_logger(__name__)

E = TypeVar("E", bound=RunEvent)

MAX_BATCH = 512


@dataclass
class _Pending:
    user_id: str
    event: RunEvent
    done: asyncio.Future[RunEvent] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class EventLog:
    def __init__(self, db: Database, bus: EventBus, metrics: Metrics) -> None:
        self._db = db
        self._bus = bus
        self._metrics = metrics
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._closed = False

    async def append(self, user_id: str, event: E) -> E:
        """Persist and deliver `event` (thread_id and run_id set); returns it with seq and id."""
        if self._closed:
            raise Unavailable("the event log is closed")
        pending = _Pending(user_id, event)
        self._queue.put_nowait(pending)
        self._metrics.eventlog_queue_depth.set(self._queue.qsize())
        stored = await asyncio.shield(pending.done)
        assert isinstance(stored, type(event))
        return stored

    async def run(self) -> None:
        """The writer loop; runs until cancelled, then flushes what is queued."""
        try:
            while True:
                batch = [await self._queue.get()]
                while len(batch) < MAX_BATCH and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                await self._write_batch(batch)
        finally:
            self._closed = True

    async def flush(self) -> None:
        """Write everything queued now (used at shutdown, after the writer task stopped)."""
        batch: list[_Pending] = []
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
            if len(batch) == MAX_BATCH:
                await self._write_batch(batch)
                batch = []
        if batch:
            await self._write_batch(batch)

    async def _write_batch(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            stored = await self._persist(batch)
        except Exception as exc:
            log.exception("eventlog.write_failed", batch=len(batch))
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(Unavailable(f"could not persist event: {exc}"))
            return
        self._metrics.eventlog_batch_size.observe(len(batch))
        self._metrics.eventlog_commit_seconds.observe(time.perf_counter() - started)
        deliveries = [
            Delivery(p.user_id, event.thread_id, event.seq, frame)
            for p, (event, frame) in zip(batch, stored, strict=True)
        ]
        try:
            await self._bus.publish(deliveries)
        except Exception:
            # Stored but not delivered live: clients get these events on resume.
            log.exception("eventlog.publish_failed", batch=len(batch))
        for pending, (event, _frame) in zip(batch, stored, strict=True):
            if not pending.done.done():
                pending.done.set_result(event)

    async def _persist(self, batch: list[_Pending]) -> list[tuple[RunEvent, str]]:
        counts: dict[str, int] = {}
        for pending in batch:
            counts[pending.event.thread_id] = counts.get(pending.event.thread_id, 0) + 1
        async with self._db.write() as session:
            next_seq: dict[str, int] = {}
            for thread_id, count in counts.items():
                last = await queries.reserve_seqs(session, thread_id=thread_id, count=count)
                next_seq[thread_id] = last - count + 1
            stored: list[tuple[RunEvent, str]] = []
            rows = []
            now = utcnow()
            for pending in batch:
                thread_id = pending.event.thread_id
                seq = next_seq[thread_id]
                next_seq[thread_id] = seq + 1
                event = pending.event.model_copy(update={"seq": seq, "event_id": str(uuid.uuid4())})
                frame = event.to_json()
                stored.append((event, frame))
                rows.append(
                    {
                        "id": event.event_id,
                        "thread_id": thread_id,
                        "run_id": event.run_id,
                        "seq": seq,
                        "type": event.type,
                        "frame": frame,
                        "created_at": now,
                    }
                )
            await session.execute(insert(Event), rows)
        return stored
