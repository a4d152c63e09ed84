"""Instance leases: telling a live instance from a dead one, and ending a dead one's runs.

Several instances share one PostgreSQL. A run belongs to the instance that accepted it (the
run's `instance_id`); if that process dies (`kill -9`, a lost machine) nothing would ever end
its runs, and clients would wait in silence. So each instance holds a lease: its row in
`instances`, renewed every `INSTANCE_HEARTBEAT_S`. On the same tick every instance sweeps: an
instance whose heartbeat is older than `INSTANCE_LEASE_S` is declared dead, and the `running`
runs of dead instances are ended with `agent_error interrupted` (retryable) through the event
log, which publishes the terminal event to the user's connections on every instance. A dead
instance is thus taken over within about `INSTANCE_LEASE_S + INSTANCE_HEARTBEAT_S`.

Why end the runs rather than continue them on a live instance: the model history of a run in
flight (its messages up to the last completed tool call) is not stored, only the events sent
to the client, and clients have already shown part of the answer that a continuation would
write differently (the protocol cannot take back a delta); a tool call would run twice, with
its side effects. `interrupted` is retryable: the client sends the message again.

The rules that keep this safe:
- Times are the database's clock (`now()`), never a process's: no clock skew between machines.
- Death is declared, once, by a conditional update (`instances.dead`): of several sweepers one
  declares it, a renewal that commits first keeps the instance alive, and a declared instance
  never renews that row again. Any sweeper then ends its runs (a sweeper that crashes half-way
  leaves the rest to the next one) and deletes the row when none is left running.
- An instance never declares itself dead, and declares no one while its own renewals have not
  succeeded for a whole lease: after a database outage every instance first gets a lease's
  time to renew, so an outage (which the event log rides out) never looks like deaths.
- An instance learns that it was declared dead from its next renewal (it was paused, or cut
  off from the database, for longer than the lease): it ends its own runs as interrupted too
  (whichever of it and a sweeper writes first wins, the other write is a no-op), registers
  anew under a new id and serves on. It does not end its runs merely because its renewals
  fail: the database may be away for everyone, and then nobody can take them.
- A clean shutdown declares its own instance dead after the drain: peers forget it at once.

An instance paused past its lease may still hold progress events of runs a peer has ended
meanwhile, in the moment between waking up and its next renewal: the event log drops them (on
PostgreSQL it locks the batch's threads, then keeps only events of runs still `running`; see
`_fence` in store/batch.py), so no event follows a run's terminal event. A message accepted in
that moment is stored under the old id: its run is ended `interrupted` like the others (by
the instance at its next renewal or by a peer's sweep, whichever writes first), or, accepted
while the instance registers anew, finishes normally unless a peer's sweep ends it first.

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


class InstanceLease:
    """This instance's lease, renewed on a timer, and the sweep of dead peers."""

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
        self._lease_s = lease_s
        # Since when every renewal has succeeded (monotonic); None while they fail.
        self._renewing_since: float | None = None

    @property
    def instance_id(self) -> str:
        return self._id

    async def register(self) -> None:
        async with self._db.write() as session:
            await queries.register_instance(session, instance_id=self._id)
        self._renewing_since = time.monotonic()

    async def run(self) -> None:
        """Renew and sweep every heartbeat, until cancelled."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            await self.tick()

    async def tick(self) -> None:
        try:
            await self._renew()
        except Exception as exc:
            if self._renewing_since is not None:
                log.warning("instance.heartbeat_failed", error=type(exc).__name__)
            self._renewing_since = None
            return  # nor can this instance sweep now
        try:
            await self.sweep()
        except Exception as exc:
            log.warning("instance.sweep_failed", error=type(exc).__name__)

    async def sweep(self) -> int:
        """Declare peers dead whose lease expired, and end the running runs of every dead
        instance; returns how many runs this call ended."""
        if self._may_declare():
            async with self._db.write() as session:
                declared = await queries.declare_dead(
                    session, lease=timedelta(seconds=self._lease_s), except_id=self._id
                )
            for instance_id in declared:
                log.warning("instance.declared_dead", dead_instance=instance_id)
        async with self._db.read() as session:
            dead = await queries.dead_instances(session)
        total = 0
        for instance_id in dead:
            ended = await self._supervisor.end_runs_of_instance(instance_id, TAKEN_OVER)
            async with self._db.write() as session:
                forgotten = await queries.forget_instance(session, instance_id=instance_id)
            if ended:
                log.warning("instance.taken_over", dead_instance=instance_id, runs_ended=ended)
            total += ended
            if forgotten:
                log.info("instance.forgotten", dead_instance=instance_id)
        return total

    async def release(self) -> None:
        """Give the lease up at a clean shutdown, after the drain."""
        async with self._db.write() as session:
            await queries.give_up_instance(session, instance_id=self._id)

    def _may_declare(self) -> bool:
        """Only after a whole lease of successful renewals: every live peer has had the time
        to renew its own lease since the database last answered us."""
        since = self._renewing_since
        return since is not None and time.monotonic() - since >= self._lease_s

    async def _renew(self) -> None:
        async with self._db.write() as session:
            held = await queries.renew_instance(session, instance_id=self._id)
        if held:
            if self._renewing_since is None:
                self._renewing_since = time.monotonic()
                log.info("instance.heartbeat_recovered", instance_id=self._id)
            return
        await self._start_over()

    async def _start_over(self) -> None:
        """We were declared dead: peers own our runs now. End ours, serve on under a new id."""
        old = self._id
        interrupted = self._supervisor.interrupt_runs(TAKEN_OVER)
        self._id = f"{old.rsplit('-', 1)[0]}-{uuid.uuid4().hex[:8]}"
        await self.register()  # if this fails, the next renewal finds no row and retries
        self._supervisor.use_instance_id(self._id)
        log.error("instance.lease_lost", old_id=old, new_id=self._id, runs=interrupted)
