"""Ending runs that a dead process left `running`. Each is ended with `agent_error interrupted`
through `EventLog.finish`, whose conditional update lets exactly one writer end a run: any
number of instances may sweep at once, and a run that its live owner ends meanwhile keeps the
owner's terminal event. Sweeping touches no admission counter (these runs were never admitted
here).

Who decides that a process is dead: on SQLite, startup (this process is the file's only
server); on a shared database, an expired instance lease (`leases.py`), and as a backstop for
runs of no known instance, a run's age past its deadline (`Supervisor.recover_orphans`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Container
from datetime import datetime

from parley.observability import get_logger
from parley.protocol import AgentError
from parley.store import queries
from parley.store.db import Database
from parley.store.eventlog import EventLog, Finish

log = get_logger(__name__)

SERVER_STOPPED = "the server stopped while this run was in progress"


async def end_orphans(
    *,
    db: Database,
    event_log: EventLog,
    started_before: datetime | None,
    owned_here: Container[str],
    instance_id: str | None = None,
    message: str = SERVER_STOPPED,
) -> int:
    """End every `running` run started before `started_before` (all, when None) of
    `instance_id` (any, when None) that this process does not own; returns how many this
    call ended."""
    async with db.read() as session:
        stale = await queries.running_runs(
            session, started_before=started_before, instance_id=instance_id
        )
    finishes = [
        Finish(
            user_id=row.user_id,
            event=AgentError(
                code="interrupted",
                message=message,
                retryable=True,
                thread_id=row.thread_id,
                run_id=row.id,
            ),
            status="error",
            error_code="interrupted",
        )
        for row in stale
        if row.id not in owned_here
    ]
    # Submitted together, so that the event log writes them in one batch (one transaction).
    stored = await asyncio.gather(*(event_log.finish(finish) for finish in finishes))
    ended = sum(1 for event in stored if event is not None)
    if ended:
        log.warning("supervisor.orphans_recovered", count=ended, instance_id=instance_id)
    return ended
