"""When the event log's writer starts its next batch: at once, unless events are arriving so fast
that waiting a few milliseconds gathers many more of them into the same transaction.

A batch costs a fixed share (the hop to the database thread, BEGIN and COMMIT, the WAL pages
written once per commit however many rows changed them) plus a share per event. Taking a batch
as soon as the previous one committed keeps latency lowest, but under load it commits every few
milliseconds with a handful of events each, and the fixed share dominates: a stored delta costs
~25 µs of the database thread in batches of 20 and ~18 µs in batches of 40 (bench/README.md).
So, like PostgreSQL's `commit_delay` (which only waits when enough other transactions are
open), the writer waits only while events arrive at about `busy_rate` per second or more, and
then no longer than until `spacing_s` after the previous batch began. An idle or lightly
loaded server (one client, tens of streams) never waits.
"""

from __future__ import annotations

import math

# A batch at most every 10 ms under load: a delta (itself gathered over 40 ms) reaches its
# reader at most this much later, well within what a reader can tell.
SPACING_S = 0.01
# From this arrival rate on (events per second) a 10 ms wait gathers 25 events or more; below it
# the wait would cost latency for too little saved (200 streams send ~4,000 events a second).
BUSY_RATE = 2500.0
# The rate is counted over about this long (or five spacings, if longer), so that a burst (many
# conversations' deltas due at the same moment) is not taken for load.
HORIZON_S = 0.05


class CommitPacer:
    """Decides how long the writer waits before taking the next batch, from the recent arrival
    rate and when the last batch began. Times are the event loop's clock, in seconds.

    The rate is an exponentially decaying count of the events taken: each weighs less the
    longer ago it was taken, and the count over the horizon is the rate. Once the writer waits,
    its batches are larger and the latest one weighs a little more: spacing goes on down to
    about nine tenths of `busy_rate` (a margin that keeps it from switching on and off at the
    threshold)."""

    def __init__(self, *, spacing_s: float = SPACING_S, busy_rate: float = BUSY_RATE) -> None:
        self._spacing_s = spacing_s
        self._horizon_s = max(HORIZON_S, 5 * spacing_s)
        self._busy_count = busy_rate * self._horizon_s
        self._recent = 0.0  # the decaying count, as of the last batch
        self._last_start: float | None = None

    def wait_before_batch(self, now: float) -> float:
        """Seconds to wait (0 for none) before taking the next batch, whose first event is
        there at `now`."""
        if self._last_start is None:
            return 0.0
        until = self._last_start + self._spacing_s - now
        if until <= 0 or self._recent_at(now) < self._busy_count:
            return 0.0
        return until

    def batch_taken(self, started: float, size: int) -> None:
        """A batch of `size` events was taken at `started`."""
        self._recent = self._recent_at(started) + size
        self._last_start = started

    def _recent_at(self, now: float) -> float:
        if self._last_start is None:
            return 0.0
        return self._recent * math.exp((self._last_start - now) / self._horizon_s)
