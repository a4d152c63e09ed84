"""A run's outlet to the event log: tags each event with the run, coalesces streamed text, and
stops accepting events once the run's end has been decided.

Streamed text is the hot path: a model sends a token every few milliseconds, and storing and
sending each one on its own costs a transaction share, an encoding and a WebSocket frame per
token. `text` only appends to the run's pending delta; one `agent_message_delta` carrying all of
it is submitted when the coalescing window (`DELTA_WINDOW_S`) has passed since the first pending
token, or at once before any other event of the run (so order is kept), or when the run ends.
Clients already accept any chunking; the concatenation of the deltas is unchanged.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

from parley.protocol import AgentMessageDelta, RunEvent
from parley.store.eventlog import EventLog

E = TypeVar("E", bound=RunEvent)

# Long enough to carry several tokens of a fast model in one event, short enough that a reader
# never sees a gap of more than about this between two pieces of the answer.
DELTA_WINDOW_S = 0.04


class RunClosed(Exception):
    """The run's end has been decided; it emits nothing more."""


class RunEmitter:
    def __init__(
        self,
        *,
        user_id: str,
        thread_id: str,
        run_id: str,
        event_log: EventLog,
        window_s: float = DELTA_WINDOW_S,
    ) -> None:
        self._user_id = user_id
        self._tag = {"thread_id": thread_id, "run_id": run_id}
        self._log = event_log
        self._window_s = window_s
        self._loop = asyncio.get_running_loop()  # a run's emitter is made in the serving loop
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        # Submissions not yet stored (or refused), and who waits for there to be none: one
        # count rather than waiting on each submission's future, which cost more per run than
        # storing a delta (a run submits one per 40 ms of streamed text).
        self._unsettled = 0
        self._all_settled: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def text(self, chunk: str) -> None:
        """Add streamed answer text (never blocks)."""
        if self._closed:
            raise RunClosed
        if not chunk:
            return
        self._pending.append(chunk)
        if self._timer is None:
            self._timer = self._loop.call_later(self._window_s, self._flush_text)

    async def emit(self, event: E) -> E:
        """Store `event` after any pending text; returns it stored (with seq)."""
        if self._closed:
            raise RunClosed
        self._flush_text()
        self._raise_failure()
        stored: E = await asyncio.shield(self._log.submit(self._user_id, self._tagged(event)))
        return stored

    def post(self, event: RunEvent) -> None:
        """Submit `event` after any pending text without waiting for it to be stored: the event
        log stores a run's submissions in the order they came, so a run can go on (ask the
        model) while its progress note commits. A failure to store it is raised by the next
        `emit` or `drain`."""
        if self._closed:
            raise RunClosed
        self._flush_text()
        self._raise_failure()
        self._track(self._log.post(self._user_id, self._tagged(event)))

    async def drain(self) -> None:
        """Submit pending text and wait until everything emitted is stored; raises the first
        failure to store any of it."""
        self._flush_text()
        if self._unsettled:
            if self._all_settled is None or self._all_settled.done():
                self._all_settled = self._loop.create_future()
            # Shielded: one drain cancelled leaves the waiter to any other drain under way.
            await asyncio.shield(self._all_settled)
        self._raise_failure()

    def close(self) -> None:
        """No more events from this run. Text the model already streamed is submitted first
        (a run that fails half-way still shows the reader what it wrote, once)."""
        self._flush_text()
        self._closed = True

    def _flush_text(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending or self._closed:
            return
        text = "".join(self._pending)
        self._pending.clear()
        # Made tagged, not copied: this runs for every delta.
        delta = AgentMessageDelta(text=text, **self._tag)
        self._track(self._log.post(self._user_id, delta))

    def _track(self, future: asyncio.Future[None]) -> None:
        self._unsettled += 1
        future.add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future[None]) -> None:
        self._unsettled -= 1
        if not future.cancelled():
            error = future.exception()
            if error is not None and self._failure is None:
                self._failure = error
        waiter = self._all_settled
        if self._unsettled == 0 and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _tagged(self, event: E) -> E:
        return event.model_copy(update=self._tag)
