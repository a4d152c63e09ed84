"""Instance leases: telling a live instance from a dead one, and ending a dead one's runs.

Several instances share one PostgreSQL. A run belongs to the instance that accepted it (the
run's `instance_id`); if that process dies (`kill -9`, a lost machine) nothing would ever end
its runs, and clients would wait in silence. So each instance holds a lease: its row in
`instances`, renewed every `INSTANCE_HEARTBEAT_S`. Every instance also sweeps, on the same
tick: an instance whose heartbeat is older than `INSTANCE_LEASE_S` is dead, and its `running`
runs are ended with `agent_error interrupted` (retryable) through the event log, which
publishes the terminal event to the user's connections on every instance. A dead instance is
thus taken over within about `INSTANCE_LEASE_S + INSTANCE_HEARTBEAT_S`.

Why end the runs rather than continue them on a live instance: the model history of a run in
flight (its messages up to the last completed tool call) is not stored, only the events sent
to the client, and clients have already shown part of the answer that a continuation would
write differently (the protocol cannot take back a delta); a tool call would be repeated with
its side effects. `interrupted` is retryable: the client sends the message again.

The rules that keep this safe:
- Times are the database's clock (`now()`), never a process's: no clock skew between machines.
- An instance never sweeps itself (the sweep excludes its own id).
- An expired lease is never renewed (the renewal is conditional on the lease still holding).
  Being dead is final for an id: a sweeper that saw it expired cannot race a revival.
- An instance that finds its lease expired (it was paused, or cut off from the database) ends
  its own runs as interrupted too (whichever of it and a sweeper writes first wins; the other
  write is a no-op) and registers anew under a new id, then serves on. It does the same
  already when its renewals have failed for `INSTANCE_LEASE_S - INSTANCE_HEARTBEAT_S`: from then
  on a peer may declare it dead at any moment, and its runs must not outlive their takeover.
- The dead instance's row is deleted only once none of its runs is running.

SQLite has no lease: it is served by one process, which ends every run left `running` at startup.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta

from parley.observability import get_logger
from parley.store import queries
from parley.store.db import Database
from parley.supervisor.core import Supervisor

log = get_logger(__name__)

TAKEN_OVER = "the server instance running this run stopped responding; send the message again"
LEASE_IN_DOUBT = "this server lost contact with the database; send the message again"


class InstanceLease:
    """This instance's lease, renewed on a timer, and the sweep of expired peers."""

    def __init__(
        self,
        *,
        db: Database,
        supervisor: Supervisor,
        instance_id: str,
        heartbeat_s: float,
        lease_s: float,
    ) -> None:
        self._db = db
        self._supervisor = supervisor
        self._id = instance_id
        self._heartbeat_s = heartbeat_s
        self._lease = timedelta(seconds=lease_s)
        # Past this long without a successful renewal, peers may declare us dead any moment.
        self._doubt_after_s = lease_s - heartbeat_s
        self._renewed_at = time.monotonic()  # when the last successful renewal *started*
        self._in_doubt = False

    @property
    def instance_id(self) -> str:
        return self._id

    async def register(self) -> None:
        started = time.monotonic()
        async with self._db.write() as session:
            await queries.register_instance(session, instance_id=self._id)
        self._renewed_at = started
        self._in_doubt = False

    async def run(self) -> None:
        """Renew and sweep every heartbeat, until cancelled."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            await self.tick()

    async def tick(self) -> None:
        try:
            await self._renew()
        except Exception:
            log.exception("instance.renew_failed", instance_id=self._id)
        try:
            await self.sweep()
        except Exception as exc:
            log.warning("instance.sweep_failed", error=type(exc).__name__)

    async def sweep(self) -> int:
        """End the running runs of every peer whose lease expired; returns how many."""
        async with self._db.read() as session:
            dead = await queries.expired_instances(session, lease=self._lease, except_id=self._id)
        total = 0
        for instance_id in dead:
            ended = await self._supervisor.end_runs_of_instance(instance_id, TAKEN_OVER)
            async with self._db.write() as session:
                forgotten = await queries.forget_instance(
                    session, instance_id=instance_id, lease=self._lease
                )
            if ended or forgotten:
                log.warning(
                    "instance.taken_over",
                    dead_instance=instance_id,
                    runs_ended=ended,
                    forgotten=forgotten,
                )
            total += ended
        return total

    async def release(self) -> None:
        """Give the lease up at a clean shutdown, after the drain."""
        async with self._db.write() as session:
            await queries.expire_instance(session, instance_id=self._id)

    async def _renew(self) -> None:
        started = time.monotonic()
        try:
            async with self._db.write() as session:
                held = await queries.renew_instance(
                    session, instance_id=self._id, lease=self._lease
                )
        except Exception as exc:
            silent_s = time.monotonic() - self._renewed_at
            log.warning("instance.heartbeat_failed", error=type(exc).__name__, silent_s=silent_s)
            if silent_s > self._doubt_after_s and not self._in_doubt:
                self._in_doubt = True
                interrupted = self._supervisor.interrupt_runs(LEASE_IN_DOUBT)
                log.error("instance.lease_in_doubt", instance_id=self._id, runs=interrupted)
            return
        if held:
            self._renewed_at = started
            self._in_doubt = False
            return
        await self._start_over()

    async def _start_over(self) -> None:
        """Our lease expired: peers own our runs now. End ours, and serve on under a new id."""
        old = self._id
        interrupted = self._supervisor.interrupt_runs(TAKEN_OVER)
        self._id = f"{old.rsplit('-', 1)[0]}-{uuid.uuid4().hex[:8]}"
        await self.register()  # if this fails, the next renewal finds no row and retries
        self._supervisor.use_instance_id(self._id)
        log.error("instance.lease_lost", old_id=old, new_id=self._id, runs=interrupted)
