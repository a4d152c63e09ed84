"""What the event log stores, and one batch of it stored in one transaction.

The work items (a user message to accept, a run event, a run's end) and the synchronous steps
that store a batch of them: its seqs taken for all its threads at once (`queries.reserve_seqs`),
its events in multi-row inserts, a run's acceptance and a run's end each written so that it
happens once (see eventlog.py for the invariants). The steps run whole inside
`Database.run_write` (on SQLite in the database thread), so none may touch the event loop, the
works' futures included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from parley.bus import Delivery
from parley.errors import NotFound
from parley.protocol import AgentStarted, RunEvent, TerminalEvent, Usage
from parley.store import queries
from parley.store.models import utcnow

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
class Work:
    user_id: str
    item: Intake | Finish | RunEvent
    done: asyncio.Future[Any]
    # Whether the submitter reads the stored event back (with its seq and id): streamed text
    # and progress notes are only waited for, and copying a frozen event costs more than
    # storing it.
    wants_event: bool = True


# ---------------------------------------------------------------------------- one transaction


def persist_batch(
    connection: Connection, batch: list[Work], fence: bool
) -> tuple[list[Any], list[Delivery]]:
    """Store the batch. Returns each work's result (in order) and the stored events to deliver
    (in seq order per thread)."""
    results: list[Any] = []
    to_store: list[tuple[Work, RunEvent]] = []
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
    batch: list[Work],
    results: list[Any],
    to_store: list[tuple[Work, RunEvent]],
) -> list[tuple[Work, RunEvent]]:
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
