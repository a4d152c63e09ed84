"""One run from start to its terminal event. Invariant: every run that was accepted ends with
exactly one terminal event within its deadline, whatever the body does.

A run is two tasks. The *body* runs the agent and may fail, hang, be cancelled or even ignore
cancellation; the *owner* (`own_run`) starts the body, waits for it, for a stop request or for
the deadline, decides the outcome and writes the terminal event through the event log, in the
same transaction as the run's final status (see `EventLog.finish`). The owner is never cancelled
by `stop_agent` or a deadline. A body that ignores cancellation is abandoned after
`CANCEL_GRACE_S`: its emitter is closed first, so nothing it does later reaches the log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from parley.agents.runner import AgentOutcome
from parley.errors import ParleyError
from parley.llm import classify_llm_error
from parley.observability import Metrics, get_logger
from parley.protocol import AgentCancelled, AgentCompleted, AgentError, TerminalEvent
from parley.store import queries
from parley.store.eventlog import EventLog, Finish
from parley.supervisor.admission import Slot
from parley.supervisor.emitter import RunEmitter

log = get_logger(__name__)

# How long a cancelled body may take to unwind before the run ends without it. With short run
# timeouts the reserve shrinks (a fifth of the timeout), so the deadline still holds.
CANCEL_GRACE_S = 2.0
# The terminal write is retried (the database may be restarting); if every attempt fails the run
# stays `running` in the store and an orphan sweep ends it later, terminal event included.
TERMINAL_WRITE_ATTEMPTS = 5


@dataclass(eq=False)
class Run:
    run_id: str
    user_id: str
    thread_id: str
    message_id: str
    agent_name: str
    content: str
    new_thread: bool
    slot: Slot
    emitter: RunEmitter
    deadline: float  # time.monotonic() by which the terminal event is written
    started: float = field(default_factory=time.monotonic)
    cancel_reason: str | None = None
    # Set when the run is stopped because this instance lost its lease (see leases.py): it
    # then ends as `agent_error interrupted`, as a peer taking it over would end it.
    interruption: str | None = None
    stop_requested: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    body: asyncio.Task[AgentOutcome] | None = None
    owner: asyncio.Task[None] | None = None

    @property
    def ending(self) -> bool:
        """Its outcome is decided (the body ended, or the emitter was closed before the terminal
        event is written): a stop can no longer change it."""
        return self.emitter.closed or (self.body is not None and self.body.done())

    def request_stop(self, reason: str) -> None:
        """Ask the run to end as cancelled (the first reason wins); safe at any moment."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if not self.stop_requested.done():
            self.stop_requested.set_result(None)

    def request_interrupt(self, message: str) -> None:
        """Ask the run to end as `agent_error interrupted` (unless a stop came first)."""
        if self.cancel_reason is None:
            self.interruption = message
        self.request_stop("interrupted")

    def stopped_event(self) -> TerminalEvent:
        """The terminal event of a run that was asked to stop."""
        if self.interruption is not None:
            return AgentError(code="interrupted", message=self.interruption, retryable=True)
        return AgentCancelled(reason=self.cancel_reason or "cancelled")


Body = Callable[[Run], Coroutine[Any, Any, AgentOutcome]]


async def own_run(
    run: Run,
    body: Body,
    *,
    event_log: EventLog,
    metrics: Metrics,
    run_timeout_s: float,
    on_end: Callable[[Run], object],
) -> None:
    terminal: TerminalEvent
    answer: str | None = None
    outcome: AgentOutcome | None = None
    try:
        if run.cancel_reason is not None:  # stopped before it began
            terminal = run.stopped_event()
        else:
            terminal, outcome = await _run_body(run, body, run_timeout_s)
            if isinstance(terminal, AgentCompleted):
                answer = terminal.content
    except Exception as exc:
        # Only bookkeeping can fail here (e.g. the database is gone); still end the run.
        terminal = error_event(run.run_id, exc)
    run.emitter.close()
    status = _STATUS[terminal.type]

    def ended() -> None:
        run.slot.release()  # both idempotent: done once the end is stored, again below
        on_end(run)

    try:
        await _write_terminal(run, terminal, status, outcome, answer, event_log, ended)
    finally:
        ended()
        metrics.runs.labels(outcome=status).inc()
        metrics.run_seconds.observe(time.monotonic() - run.started)
        log.info(
            "run.ended",
            run_id=run.run_id,
            user_id=run.user_id,
            thread_id=run.thread_id,
            outcome=status,
            code=terminal.code if isinstance(terminal, AgentError) else None,
            duration_ms=int((time.monotonic() - run.started) * 1000),
        )


async def _run_body(
    run: Run, body: Body, run_timeout_s: float
) -> tuple[TerminalEvent, AgentOutcome | None]:
    run.body = asyncio.create_task(body(run), name=f"run-body-{run.run_id}")
    # Before the deadline, leave time for unwinding a cancelled body and the terminal write.
    reserve = min(CANCEL_GRACE_S + 0.5, run_timeout_s / 5)
    grace = max(0.05, reserve - 0.25)
    remaining = max(0.05, run.deadline - reserve - time.monotonic())
    waiting: set[asyncio.Future[Any]] = {run.body, run.stop_requested}
    await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
    if not run.body.done():
        timed_out = not run.stop_requested.done()
        run.emitter.close()
        run.body.cancel()
        await asyncio.wait({run.body}, timeout=grace)
        if not run.body.done():
            log.error("run.body_abandoned", run_id=run.run_id, reason="ignored cancellation")
            run.body.add_done_callback(_consume)
        if timed_out:
            return AgentError(
                code="timeout",
                message=f"the run did not finish within {run_timeout_s:g}s",
                retryable=True,
            ), None
        return run.stopped_event(), None
    if run.body.cancelled():
        return run.stopped_event(), None
    exc = run.body.exception()
    if exc is not None:
        return error_event(run.run_id, exc), None
    outcome = run.body.result()
    await run.emitter.drain()  # every delta stored before the answer is declared complete
    return AgentCompleted(
        message_id=queries.new_id(),
        content=outcome.content,
        usage=outcome.usage,
        duration_ms=int((time.monotonic() - run.started) * 1000),
    ), outcome


async def _write_terminal(
    run: Run,
    terminal: TerminalEvent,
    status: str,
    outcome: AgentOutcome | None,
    answer: str | None,
    event_log: EventLog,
    on_stored: Callable[[], None],
) -> None:
    finish = Finish(
        user_id=run.user_id,
        event=terminal.model_copy(update={"thread_id": run.thread_id, "run_id": run.run_id}),
        status=status,
        error_code=terminal.code if isinstance(terminal, AgentError) else None,
        usage=outcome.usage if outcome is not None else None,
        answer=answer,
        on_stored=on_stored,
    )
    for attempt in range(TERMINAL_WRITE_ATTEMPTS):
        try:
            if await event_log.finish(finish) is None:
                log.warning("run.already_ended", run_id=run.run_id)
            return
        except Exception:
            log.exception("run.terminal_write_failed", run_id=run.run_id, attempt=attempt)
            await asyncio.sleep(0.2 * 2**attempt)


def error_event(run_id: str, exc: BaseException) -> AgentError:
    """The terminal event for a failure; failures of the model are logged with their cause."""
    leaf = _unwrap(exc)
    error = classify_llm_error(leaf)
    if error is None:
        log.error("run.failed", run_id=run_id, error=type(leaf).__name__, detail=str(leaf))
        error = ParleyError("the agent failed unexpectedly", code="internal_error")
    elif not isinstance(leaf, ParleyError) or error.code.startswith("llm"):
        log.warning(
            "run.llm_failed",
            run_id=run_id,
            code=error.code,
            cause=type(leaf).__name__,
            status=getattr(leaf, "status_code", None),
            detail=str(leaf)[:300],
        )
    return AgentError(code=error.code, message=error.message, retryable=error.retryable)


_STATUS = {"agent_completed": "completed", "agent_error": "error", "agent_cancelled": "cancelled"}


def _unwrap(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (task groups inside libraries wrap errors)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _consume(task: asyncio.Task[AgentOutcome]) -> None:
    """Retrieve an abandoned body's result so it is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()
