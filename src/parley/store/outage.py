"""Riding out a short database outage: which errors are worth retrying, and where one outage
stands (since when, the next backoff delay, whether its grace is spent).

A database restart or failover takes seconds; a run takes longer. Rather than failing every
run in flight at the first refused connection, the event log holds their events in memory and
retries its commit for `DATABASE_OUTAGE_GRACE_S` (see `EventLog`). The backoff is this small
loop rather than a retry library's decorator because the writer does work between attempts
(it answers new messages at once and, past the grace, fails what can no longer wait).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import exc as sa_exc

FIRST_DELAY_S = 0.05
MAX_DELAY_S = 1.0

# SQLSTATE classes that say "not now" rather than "never": connection exceptions (08),
# insufficient resources (53), operator intervention such as a shutdown or a server still
# starting (57P), and transaction rollbacks for serialization failures and deadlocks (40).
_TRANSIENT_SQLSTATES = ("08", "53", "57P", "40")


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached or dropped the connection (worth
    retrying), as opposed to refusing what was asked (a retry would fail the same way)."""
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
            return True  # SQLite "database is locked", a closed PostgreSQL connection
        state = getattr(exc.orig, "sqlstate", None)
        return isinstance(state, str) and state.startswith(_TRANSIENT_SQLSTATES)
    # A refused connection is raised as it is (OSError), not wrapped by SQLAlchemy.
    return isinstance(exc, OSError | TimeoutError | sa_exc.TimeoutError | sa_exc.DisconnectionError)


class Outage:
    """One database outage as the event log's writer sees it, from its first transient error
    to its next successful commit."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self._clock = clock
        self._since: float | None = None
        self._delay = FIRST_DELAY_S

    @property
    def active(self) -> bool:
        return self._since is not None

    def begin(self) -> None:
        if self._since is None:
            self._since = self._clock()
            self._delay = FIRST_DELAY_S

    def past_grace(self) -> bool:
        return self._since is not None and self._clock() - self._since >= self.grace_s

    def next_delay(self) -> float:
        delay = self._delay
        self._delay = min(self._delay * 2, MAX_DELAY_S)
        return delay

    def end(self) -> float:
        """The outage is over; returns how long it lasted, in seconds."""
        lasted = 0.0 if self._since is None else self._clock() - self._since
        self._since = None
        return lasted
