"""Admission: the global and per-user limits on runs in progress, and the per-user message
rate. Invariant: a slot is checked and taken in one synchronous step (no `await` between the
check and the reservation), so concurrent submits can never exceed a limit, and every slot is
released exactly once.

The limits are per instance (a cluster of N instances admits N times as many); see README.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from parley.counters import PerUserCounter
from parley.errors import RateLimited, ServerBusy
from parley.observability import Metrics

RATE_WINDOW_S = 60.0
# How many reservations between two sweeps of users whose rate window has emptied.
_PRUNE_EVERY = 1024


@dataclass(frozen=True)
class Limits:
    run_timeout_s: float
    max_concurrent_runs: int
    max_runs_per_user: int
    rate_limit_per_minute: int
    history_messages: int
    # How long a run's own reads (its history) wait out a database outage, like the event log.
    database_outage_grace_s: float = 10.0


class Slot:
    """One admitted run's place. `release` frees it (idempotent); `refund` also takes back the
    message from the rate window (for a message that did not start a run: a duplicate, or one
    that could not be stored)."""

    def __init__(self, admission: Admission, user_id: str, stamp: float) -> None:
        self._admission = admission
        self.user_id = user_id
        self._stamp = stamp
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release(self.user_id)

    def refund(self) -> None:
        if self._held:
            self.release()
            self._admission._unstamp(self.user_id, self._stamp)


class Admission:
    def __init__(
        self, limits: Limits, metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limits = limits
        self._metrics = metrics
        self._clock = clock
        self._active = 0
        self._per_user = PerUserCounter()
        self._recent: dict[str, deque[float]] = {}
        self._since_prune = 0

    @property
    def active(self) -> int:
        return self._active

    def reserve(self, user_id: str) -> Slot:
        """Take a slot for one run of `user_id`, or raise `ServerBusy` / `RateLimited`."""
        if self._active >= self._limits.max_concurrent_runs:
            self._reject("server_busy")
            raise ServerBusy("the server is at its run capacity; retry shortly")
        if self._per_user[user_id] >= self._limits.max_runs_per_user:
            self._reject("rate_limited")
            raise RateLimited(
                f"at most {self._limits.max_runs_per_user} runs may be in progress per user"
            )
        now = self._clock()
        window = self._recent.setdefault(user_id, deque())
        _expire(window, now)
        if len(window) >= self._limits.rate_limit_per_minute:
            self._reject("rate_limited")
            raise RateLimited(f"at most {self._limits.rate_limit_per_minute} messages a minute")
        window.append(now)
        self._active += 1
        self._per_user.add(user_id)
        self._metrics.runs_active.set(self._active)
        self._maybe_prune(now)
        return Slot(self, user_id, now)

    def _release(self, user_id: str) -> None:
        self._active -= 1
        self._per_user.remove(user_id)
        self._metrics.runs_active.set(self._active)

    def _unstamp(self, user_id: str, stamp: float) -> None:
        window = self._recent.get(user_id)
        if window is not None:
            # The newest matching stamp: appended last, and almost always still at the end.
            for index in range(len(window) - 1, -1, -1):
                if window[index] == stamp:
                    del window[index]
                    break

    def _reject(self, code: str) -> None:
        self._metrics.rejections.labels(code=code).inc()

    def _maybe_prune(self, now: float) -> None:
        """Forget users whose rate window has emptied, so the map does not grow with every
        user ever seen."""
        self._since_prune += 1
        if self._since_prune < _PRUNE_EVERY:
            return
        self._since_prune = 0
        for user_id in list(self._recent):
            window = self._recent[user_id]
            _expire(window, now)
            if not window:
                del self._recent[user_id]

    @property
    def tracked_users(self) -> int:
        return len(self._recent)


def _expire(window: deque[float], now: float) -> None:
    while window and now - window[0] > RATE_WINDOW_S:
        window.popleft()
