"""The supervisor owns every run. Invariant: every accepted run ends with exactly one terminal
event (`agent_completed`, `agent_error` or `agent_cancelled`) within its deadline, whatever
happens: model failure, tool failure, timeout, cancellation or shutdown.

A run is two tasks. The *body* runs the agent and may fail, hang or be cancelled; the *owner*
(`_own`) starts the body, waits for it with the deadline, decides the outcome and writes the
one terminal event. The owner is never cancelled by `stop_agent` or a deadline, so it is always
there to write that event.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError

from parley.agents import AgentRegistry
from parley.agents.runner import AgentOutcome, history_to_messages, run_agent
from parley.bus import EventBus
from parley.counters import PerUserCounter
from parley.errors import (
    NotFound,
    ParleyError,
    RateLimited,
    ServerBusy,
    Unavailable,
)
from parley.llm import LLMManager, classify_llm_error
from parley.observability import Metrics, get_logger
from parley.protocol import (
    AgentCancelled,
    AgentCompleted,
    AgentError,
    AgentStarted,
    RunEvent,
    TerminalEvent,
    UserMessage,
)
from parley.store import queries
from parley.store.db import Database
from parley.store.eventlog import EventLog
from parley.tools import RunDeps

log = get_logger(__name__)

# How long past its deadline a run recorded as running in the database is taken to be an
# orphan of a process that died: no live process can still be running it by then.
ORPHAN_MARGIN_S = 60.0
_TERMINAL_WRITE_ATTEMPTS = 5


@dataclass(frozen=True)
class Limits:
    run_timeout_s: float
    max_concurrent_runs: int
    max_runs_per_user: int
    rate_limit_per_minute: int
    history_messages: int


@dataclass(frozen=True)
class Accepted:
    client_message_id: str | None
    thread_id: str
    message_id: str
    run_id: str
    duplicate: bool


@dataclass
class _Run:
    run_id: str
    user_id: str
    thread_id: str
    message_id: str
    agent_name: str
    content: str
    started: float = field(default_factory=time.monotonic)
    body: asyncio.Task[AgentOutcome] | None = None
    owner: asyncio.Task[None] | None = None
    cancel_reason: str | None = None


class Supervisor:
    def __init__(
        self,
        *,
        db: Database,
        event_log: EventLog,
        bus: EventBus,
        agents: AgentRegistry,
        llm: LLMManager,
        limits: Limits,
        metrics: Metrics,
        instance_id: str,
    ) -> None:
        for name, dependency in (
            ("db", db),
            ("event_log", event_log),
            ("bus", bus),
            ("agents", agents),
            ("llm", llm),
        ):
            if dependency is None:
                raise ValueError(f"supervisor dependency {name!r} is missing")
        self._db = db
        self._log = event_log
        self._bus = bus
        bus.on_control(self._on_control)
        self._agents = agents
        self._llm = llm
        self._limits = limits
        self._metrics = metrics
        self._instance_id = instance_id
        self._runs: dict[str, _Run] = {}
        self._per_user = PerUserCounter()
        self._recent: dict[str, deque[float]] = {}
        self.accepting = True
        metrics.supervisor_accepting.set(1)

    # ------------------------------------------------------------------ admission

    async def submit(
        self, user_id: str, message: UserMessage, on_accepted: Callable[[Accepted], None]
    ) -> Accepted:
        """Persist the message and its run, call `on_accepted`, then start the run."""
        if message.client_message_id is not None:
            previous = await self._find_duplicate(user_id, message.client_message_id)
            if previous is not None:
                on_accepted(previous)
                return previous
        if not self.accepting:
            raise Unavailable("the server is shutting down; reconnect and retry")
        agent_name, _ = self._agents.get(message.agent)
        self._admit(user_id)
        try:
            accepted = await self._persist(user_id, message, agent_name)
        except IntegrityError:
            # The same client_message_id raced in on another connection: answer as a duplicate.
            if message.client_message_id is None:
                raise
            previous = await self._find_duplicate(user_id, message.client_message_id)
            if previous is None:
                raise
            on_accepted(previous)
            return previous
        run = _Run(
            run_id=accepted.run_id,
            user_id=user_id,
            thread_id=accepted.thread_id,
            message_id=accepted.message_id,
            agent_name=agent_name,
            content=message.content,
        )
        self._runs[run.run_id] = run
        self._per_user.add(user_id)
        self._metrics.runs_active.set(len(self._runs))
        try:
            on_accepted(accepted)
        finally:
            # Once persisted, the run starts even if the client is gone: it can resume.
            run.owner = asyncio.create_task(self._own(run), name=f"run-{run.run_id}")
        return accepted

    def _admit(self, user_id: str) -> None:
        if len(self._runs) >= self._limits.max_concurrent_runs:
            self._metrics.rejections.labels(code="server_busy").inc()
            raise ServerBusy("the server is at its run capacity; retry shortly")
        if self._per_user[user_id] >= self._limits.max_runs_per_user:
            self._metrics.rejections.labels(code="rate_limited").inc()
            raise RateLimited(
                f"at most {self._limits.max_runs_per_user} runs may be in progress per user"
            )
        now = time.monotonic()
        window = self._recent.setdefault(user_id, deque())
        while window and now - window[0] > 60.0:
            window.popleft()
        if len(window) >= self._limits.rate_limit_per_minute:
            self._metrics.rejections.labels(code="rate_limited").inc()
            raise RateLimited(f"at most {self._limits.rate_limit_per_minute} messages a minute")
        window.append(now)

    async def _find_duplicate(self, user_id: str, client_message_id: str) -> Accepted | None:
        async with self._db.read() as session:
            found = await queries.find_by_client_id(
                session, user_id=user_id, client_message_id=client_message_id
            )
        if found is None or found.run_id is None:
            return None
        return Accepted(client_message_id, found.thread_id, found.id, found.run_id, duplicate=True)

    async def _persist(self, user_id: str, message: UserMessage, agent_name: str) -> Accepted:
        run_id = queries.new_id()
        async with self._db.write() as session:
            await queries.ensure_user(session, user_id=user_id)
            if message.thread_id is None:
                thread = await queries.create_thread(
                    session, user_id=user_id, title=message.content
                )
                thread_id = thread.id
            else:
                existing = await queries.get_thread(
                    session, user_id=user_id, thread_id=message.thread_id
                )
                if existing is None:
                    raise NotFound(f"thread {message.thread_id} not found")
                thread_id = existing.id
                await queries.touch_thread(session, thread_id=thread_id)
            stored = await queries.add_message(
                session,
                thread_id=thread_id,
                user_id=user_id,
                role="user",
                content=message.content,
                client_message_id=message.client_message_id,
                run_id=run_id,
            )
            await queries.create_run(
                session,
                run_id=run_id,
                thread_id=thread_id,
                user_id=user_id,
                message_id=stored.id,
                agent=agent_name,
                instance_id=self._instance_id,
            )
        return Accepted(message.client_message_id, thread_id, stored.id, run_id, duplicate=False)

    # ------------------------------------------------------------------ control

    async def stop(self, user_id: str, run_id: str, reason: str = "user_requested") -> None:
        """Cancel a running run of this user, on this instance or (through the bus) another."""
        run = self._runs.get(run_id)
        if run is not None and run.user_id == user_id:
            self._cancel(run, reason)
            return
        not_found = NotFound(f"run {run_id} not found or already finished")
        if not self._bus.spans_instances:
            raise not_found  # no other instance can be running it
        async with self._db.read() as session:
            stored = await queries.get_run(session, user_id=user_id, run_id=run_id)
        if stored is None or stored.status != "running":
            raise not_found
        await self._bus.publish_control(
            {"type": "stop_run", "run_id": run_id, "user_id": user_id, "reason": reason}
        )

    def _on_control(self, message: dict[str, str]) -> None:
        if message.get("type") != "stop_run":
            return
        run = self._runs.get(message.get("run_id", ""))
        if run is not None and run.user_id == message.get("user_id"):
            self._cancel(run, message.get("reason") or "user_requested")

    def _cancel(self, run: _Run, reason: str) -> None:
        if run.cancel_reason is None:
            run.cancel_reason = reason
        if run.body is not None:
            run.body.cancel()

    @property
    def active_runs(self) -> int:
        return len(self._runs)

    def readiness(self) -> dict[str, Any]:
        status = "ok" if self.accepting else "down"
        return {
            "status": status,
            "accepting": self.accepting,
            "active_runs": len(self._runs),
            "agents": self._agents.names,
        }

    async def drain(self, grace_s: float) -> None:
        """Stop accepting; give running runs `grace_s` to finish, then cancel the rest."""
        self.accepting = False
        self._metrics.supervisor_accepting.set(0)
        owners = [r.owner for r in self._runs.values() if r.owner is not None]
        if owners:
            log.info("supervisor.draining", runs=len(owners), grace_s=grace_s)
            await asyncio.wait(owners, timeout=grace_s)
        for run in list(self._runs.values()):
            self._cancel(run, "server_shutdown")
        remaining = [r.owner for r in self._runs.values() if r.owner is not None]
        if remaining:
            await asyncio.wait(remaining, timeout=10.0)

    # ------------------------------------------------------------------ one run

    async def _emit(self, run: _Run, event: RunEvent) -> None:
        await self._log.append(
            run.user_id, event.model_copy(update={"thread_id": run.thread_id, "run_id": run.run_id})
        )

    async def _own(self, run: _Run) -> None:
        terminal: TerminalEvent
        outcome: AgentOutcome | None = None
        try:
            await self._emit(run, AgentStarted(agent=run.agent_name, message_id=run.message_id))
            run.body = asyncio.create_task(self._body(run), name=f"run-body-{run.run_id}")
            deadline = max(0.1, self._limits.run_timeout_s - 0.5 - (time.monotonic() - run.started))
            done, _ = await asyncio.wait({run.body}, timeout=deadline)
            if not done:
                run.body.cancel()
                await asyncio.wait({run.body})
                terminal = AgentError(
                    code="timeout",
                    message=f"the run did not finish within {self._limits.run_timeout_s:g}s",
                    retryable=True,
                )
            elif run.body.cancelled():
                terminal = AgentCancelled(reason=run.cancel_reason or "cancelled")
            elif (exc := run.body.exception()) is not None:
                terminal = self._error_event(run, exc)
            else:
                outcome = run.body.result()
                terminal = await self._complete(run, outcome)
        except Exception as exc:
            # Only bookkeeping can fail here (e.g. the database is gone); still end the run.
            terminal = self._error_event(run, exc)
        await self._finish(run, terminal, outcome)

    async def _body(self, run: _Run) -> AgentOutcome:
        _name, agent = self._agents.get(run.agent_name)
        async with self._db.read() as session:
            earlier = await queries.list_messages(
                session,
                thread_id=run.thread_id,
                limit=self._limits.history_messages + 1,
                newest_first=True,
            )
        history = [m for m in reversed(earlier) if m.id != run.message_id]
        deps = RunDeps(
            user_id=run.user_id,
            thread_id=run.thread_id,
            run_id=run.run_id,
            db=self._db,
            emit=lambda event: self._emit(run, event),
        )
        return await run_agent(
            agent,
            model_label=self._llm.display_name,
            prompt=run.content,
            history=history_to_messages(history[-self._limits.history_messages :]),
            deps=deps,
        )

    async def _complete(self, run: _Run, outcome: AgentOutcome) -> AgentCompleted:
        message_id = queries.new_id()
        async with self._db.write() as session:
            await queries.add_message(
                session,
                thread_id=run.thread_id,
                user_id=run.user_id,
                role="assistant",
                content=outcome.content,
                run_id=run.run_id,
                message_id=message_id,
            )
        return AgentCompleted(
            message_id=message_id,
            content=outcome.content,
            usage=outcome.usage,
            duration_ms=int((time.monotonic() - run.started) * 1000),
        )

    def _error_event(self, run: _Run, exc: BaseException) -> AgentError:
        error = classify_llm_error(_unwrap(exc))
        if error is None:
            log.error("run.failed", run_id=run.run_id, error=type(exc).__name__, detail=str(exc))
            error = ParleyError("the agent failed unexpectedly", code="internal_error")
        return AgentError(code=error.code, message=error.message, retryable=error.retryable)

    async def _finish(
        self, run: _Run, terminal: TerminalEvent, outcome: AgentOutcome | None
    ) -> None:
        status = {
            "agent_completed": "completed",
            "agent_error": "error",
            "agent_cancelled": "cancelled",
        }[terminal.type]
        error_code = terminal.code if isinstance(terminal, AgentError) else None
        for attempt in range(_TERMINAL_WRITE_ATTEMPTS):
            try:
                async with self._db.write() as session:
                    await queries.finish_run(
                        session,
                        run_id=run.run_id,
                        status=status,
                        error_code=error_code,
                        input_tokens=outcome.usage.input_tokens if outcome else 0,
                        output_tokens=outcome.usage.output_tokens if outcome else 0,
                    )
                await self._emit(run, terminal)
                break
            except Exception:
                log.exception("run.terminal_write_failed", run_id=run.run_id, attempt=attempt)
                await asyncio.sleep(0.2 * 2**attempt)
        self._runs.pop(run.run_id, None)
        self._per_user.remove(run.user_id)
        self._metrics.runs_active.set(len(self._runs))
        self._metrics.runs.labels(outcome=status).inc()
        self._metrics.run_seconds.observe(time.monotonic() - run.started)
        log.info(
            "run.ended",
            run_id=run.run_id,
            user_id=run.user_id,
            thread_id=run.thread_id,
            outcome=status,
            code=error_code,
            duration_ms=int((time.monotonic() - run.started) * 1000),
        )

    # ------------------------------------------------------------------ orphans

    async def recover_orphans(self, *, all_running: bool) -> int:
        """End runs left `running` by a process that died, with an `agent_error` each.

        `all_running` is for the embedded SQLite setup, where this process is the only one.
        """
        cutoff = None
        if not all_running:
            margin = timedelta(seconds=self._limits.run_timeout_s + ORPHAN_MARGIN_S)
            cutoff = datetime.now(UTC) - margin
        async with self._db.read() as session:
            stale = await queries.running_runs(session, started_before=cutoff)
        count = 0
        for row in stale:
            if row.id in self._runs:
                continue
            run = _Run(row.id, row.user_id, row.thread_id, row.message_id, row.agent, "")
            terminal = AgentError(
                code="interrupted",
                message="the server stopped while this run was in progress",
                retryable=True,
            )
            self._runs[run.run_id] = run
            await self._finish(run, terminal, None)
            count += 1
        if count:
            log.warning("supervisor.orphans_recovered", count=count)
        return count


def _unwrap(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (task groups inside libraries wrap errors)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
