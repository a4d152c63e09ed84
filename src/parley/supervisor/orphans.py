"""Ending runs that a dead process left `running`. Each is ended with `agent_error interrupted`
through `EventLog.finish`, whose conditional update lets exactly one writer end a run: any
number of instances may sweep at once, and a run that its live owner ends meanwhile keeps the
owner's terminal event. Sweeping touches no admission counter (these runs were never admitted
here).
"""

from __future__ import annotations

from collections.abc import Container
from datetime import datetime

from parley.observability import get_logger
from parley.protocol import AgentError
from parley.store import queries
from parley.store.db import Database
from parley.store.eventlog import EventLog, Finish

log = get_logger(__name__)


async def end_orphans(
    *,
    db: Database,
    event_log: EventLog,
    started_before: datetime | None,
    owned_here: Container[str],
) -> int:
    """End every `running` run started before `started_before` (all, when None) that this
    process does not own; returns how many this call ended."""
    async with db.read() as session:
        stale = await queries.running_runs(session, started_before=started_before)
    ended = 0
    for row in stale:
        if row.id in owned_here:
            continue
        terminal = AgentError(
            code="interrupted",
            message="the server stopped while this run was in progress",
            retryable=True,
            thread_id=row.thread_id,
            run_id=row.id,
        )
        finish = Finish(
            user_id=row.user_id, event=terminal, status="error", error_code="interrupted"
        )
        if await event_log.finish(finish) is not None:
            ended += 1
    if ended:
        log.warning("supervisor.orphans_recovered", count=ended)
    return ended
