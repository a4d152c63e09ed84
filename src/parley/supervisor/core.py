"""The supervisor: takes a user message, admits it, has it stored with its run, and owns the run
until its terminal event. Invariant: every accepted run ends with exactly one terminal event
(`agent_completed`, `agent_error` or `agent_cancelled`) within its deadline, whatever happens:
model failure, tool failure, timeout, a stop at any moment, shutdown.

Where to look: limits and rates in `admission.py`, one run's life in `lifecycle.py`, its event
outlet in `emitter.py`, crashed instances' runs in `orphans.py`, telling live instances from
dead ones in `leases.py`; stopping a run on another instance is the `stop` / `_on_control` pair
below.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from parley.agents import AgentRegistry
from parley.agents.runner import AgentOutcome, history_to_messages, run_agent
from parley.bus import EventBus
from parley.errors import NotFound, StorageUnavailable, Unavailable
from parley.llm import LLMManager
from parley.observability import Metrics, get_logger
from parley.protocol import UserMessage
from parley.store import queries
from parley.store.db import Database
from parley.store.eventlog import Accepted, EventLog, Intake
from parley.store.outage import Outage, is_transient
from parley.store.queries import HistoryEntry
from parley.supervisor.admission import Admission, Limits, Slot
from parley.supervisor.emitter import RunEmitter
from parley.supervisor.lifecycle import CANCEL_GRACE_S, Run, own_run
from parley.supervisor.orphans import end_orphans
from parley.tools import RunDeps

log = get_logger(__name__)

# How long past its deadline a run recorded as running in the database is taken to be an
# orphan of a process that died: no live process can still be running it by then.
ORPHAN_MARGIN_S = 60.0


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
        self._admission = Admission(limits, metrics)
        self._runs: dict[str, Run] = {}
        self.accepting = True
        self._hurry = asyncio.Event()  # a second shutdown signal: skip the drain's grace wait
        metrics.supervisor_accepting.set(1)

    # ------------------------------------------------------------------ intake

    async def submit(
        self, user_id: str, message: UserMessage, on_accepted: Callable[[Accepted], None]
    ) -> Accepted:
        """Admit the message, store it with its run, call `on_accepted`, then start the run.
        A client_message_id seen before is answered as it was, with no second run."""
        if message.client_message_id is not None:
            previous = await self._find_duplicate(user_id, message.client_message_id)
            if previous is not None:
                on_accepted(previous)
                return previous
        if not self.accepting:
            raise Unavailable("the server is shutting down; reconnect and retry")
        agent_name, _ = self._agents.get(message.agent)
        slot = self._admission.reserve(user_id)  # synchronous: check and take in one step

        def stored(accepted: Accepted) -> None:
            # Runs inside the event log's writer, before the run's first event is published.
            if accepted.duplicate:  # raced in on another connection
                slot.refund()
                on_accepted(accepted)
                return
            self._start(accepted, user_id, message, agent_name, slot, on_accepted)

        intake = Intake(
            user_id=user_id,
            content=message.content,
            thread_id=message.thread_id,
            client_message_id=message.client_message_id,
            agent=agent_name,
            instance_id=self._instance_id,
            on_stored=stored,
        )
        try:
            return await self._log.accept(intake)
        except BaseException:
            slot.refund()  # a no-op when the message was stored (the run holds the slot)
            raise

    def _start(
        self,
        accepted: Accepted,
        user_id: str,
        message: UserMessage,
        agent_name: str,
        slot: Slot,
        on_accepted: Callable[[Accepted], None],
    ) -> None:
        run = Run(
            run_id=accepted.run_id,
            user_id=user_id,
            thread_id=accepted.thread_id,
            message_id=accepted.message_id,
            agent_name=agent_name,
            content=message.content,
            new_thread=message.thread_id is None,
            slot=slot,
            emitter=RunEmitter(
                user_id=user_id,
                thread_id=accepted.thread_id,
                run_id=accepted.run_id,
                event_log=self._log,
            ),
            deadline=time.monotonic() + self._limits.run_timeout_s,
        )
        self._runs[run.run_id] = run
        if not self.accepting:
            run.request_stop("server_shutdown")  # stored while the drain began
        try:
            on_accepted(accepted)
        finally:
            # Once stored, the run starts even if the client is gone: it can resume.
            run.owner = asyncio.create_task(
                own_run(
                    run,
                    self._body,
                    event_log=self._log,
                    metrics=self._metrics,
                    run_timeout_s=self._limits.run_timeout_s,
                    on_end=lambda r: self._runs.pop(r.run_id, None),
                ),
                name=f"run-{run.run_id}",
            )

    async def _find_duplicate(self, user_id: str, client_message_id: str) -> Accepted | None:
        found = await self._db.run_read(
            lambda connection: queries.find_by_client_id(
                connection, user_id=user_id, client_message_id=client_message_id
            )
        )
        if found is None or found.run_id is None:
            return None
        return Accepted(client_message_id, found.thread_id, found.id, found.run_id, duplicate=True)

    # ------------------------------------------------------------------ the run's body

    async def _body(self, run: Run) -> AgentOutcome:
        _name, agent = self._agents.get(run.agent_name)
        history: list[HistoryEntry] = []
        if not run.new_thread and self._limits.history_messages > 0:
            earlier = await self._read_history(run.thread_id)
            history = [m for m in reversed(earlier) if m.id != run.message_id]
        deps = RunDeps(
            user_id=run.user_id,
            thread_id=run.thread_id,
            run_id=run.run_id,
            db=self._db,
            emit=run.emitter.emit,
            post=run.emitter.post,
            text=run.emitter.text,
        )
        return await run_agent(
            agent,
            prompt=run.content,
            history=history_to_messages(history[-self._limits.history_messages :]),
            deps=deps,
        )

    async def _read_history(self, thread_id: str) -> Sequence[HistoryEntry]:
        """The thread's recent messages, waiting out a short database outage the way the event
        log does (a run accepted a moment ago should not fail on a database restart)."""
        outage = Outage(self._limits.database_outage_grace_s)
        while True:
            try:
                return await self._db.run_read(
                    lambda connection: queries.recent_history(
                        connection, thread_id=thread_id, limit=self._limits.history_messages + 1
                    )
                )
            except Exception as exc:
                if not is_transient(exc):
                    raise
                outage.begin()
                if outage.past_grace():
                    raise StorageUnavailable("the database stayed unreachable") from exc
                await asyncio.sleep(outage.next_delay())

    # ------------------------------------------------------------------ control

    async def stop(self, user_id: str, run_id: str, reason: str = "user_requested") -> None:
        """Stop a running run of this user, on this instance or (through the bus) another."""
        run = self._runs.get(run_id)
        not_found = NotFound(f"run {run_id} not found or already finished")
        if run is not None and run.user_id == user_id:
            if run.ending:
                # Its terminal event is decided, maybe already sent: the run is finished for
                # whoever asks, even though its owner has not unregistered it yet.
                raise not_found
            run.request_stop(reason)
            return
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
            run.request_stop(message.get("reason") or "user_requested")

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
        """Stop accepting; give running runs `grace_s` to finish, then stop the rest, and wait
        (bounded) for their terminal events to be written."""
        self.accepting = False
        self._metrics.supervisor_accepting.set(0)
        owners = self._owners()
        if owners:
            log.info("supervisor.draining", runs=len(owners), grace_s=grace_s)
            hurried = asyncio.ensure_future(self._hurry.wait())
            try:
                deadline = time.monotonic() + grace_s
                while (owners := self._owners()) and not hurried.done():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    await asyncio.wait(
                        {*owners, hurried}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                    )
            finally:
                hurried.cancel()
        for run in list(self._runs.values()):
            run.request_stop("server_shutdown")
        deadline = time.monotonic() + CANCEL_GRACE_S + 10.0
        while (owners := self._owners()) and time.monotonic() < deadline:
            await asyncio.wait(owners, timeout=max(0.0, deadline - time.monotonic()))

    def hurry_drain(self) -> None:
        """End the drain's grace wait now: running runs are stopped (`server_shutdown`) and
        their terminal events written, as at the end of the grace."""
        self._hurry.set()

    def _owners(self) -> set[asyncio.Task[None]]:
        return {r.owner for r in self._runs.values() if r.owner is not None and not r.owner.done()}

    # ------------------------------------------------------------------ orphans

    async def recover_orphans(self, *, all_running: bool) -> int:
        """End runs left `running` by a process that died, each with `agent_error interrupted`.

        `all_running` is for the embedded SQLite setup at startup of `parley serve`, where this
        process is the only one serving that file; otherwise only runs past their deadline (and
        a margin) are taken as orphans.
        """
        cutoff = None
        if not all_running:
            margin = timedelta(seconds=self._limits.run_timeout_s + ORPHAN_MARGIN_S)
            cutoff = datetime.now(UTC) - margin
        return await end_orphans(
            db=self._db, event_log=self._log, started_before=cutoff, owned_here=self._runs
        )

    # ------------------------------------------------------------------ instance leases

    async def end_runs_of_instance(self, instance_id: str, message: str) -> int:
        """End every running run of a dead instance (its lease expired) as interrupted."""
        return await end_orphans(
            db=self._db,
            event_log=self._log,
            started_before=None,
            owned_here=self._runs,
            instance_id=instance_id,
            message=message,
        )

    def interrupt_runs(self, message: str) -> int:
        """End every run of this instance as `agent_error interrupted`: its lease is lost or in
        doubt, so a peer may be ending them already (exactly one of the two writes wins)."""
        for run in self._runs.values():
            run.request_interrupt(message)
        return len(self._runs)

    def use_instance_id(self, instance_id: str) -> None:
        """Record new runs under `instance_id` (this instance registered anew after its old
        lease expired: runs under the old id belong to whoever sweeps it)."""
        self._instance_id = instance_id
