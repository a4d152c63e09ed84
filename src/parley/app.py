"""The app factory and the server runner.

`create_app(components)` wires already-started components into a FastAPI app. Startup phases run
*before* the ASGI server binds its port (see `serve`), so a failed startup prints one line and
exits with nothing served: there is no window in which the port is open without a supervisor.

Shutdown on SIGTERM/SIGINT (`ParleyServer`): readiness turns 503 at once and new messages get
`error unavailable`; running runs get `SHUTDOWN_GRACE_S` to finish and are then cancelled with
`agent_cancelled` reason `server_shutdown`; queued frames are flushed and every socket closes
with 1001; then uvicorn stops and the components close in reverse order. A second signal
skips the grace wait (runs are still ended with their terminal events); a third exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from parley import __version__
from parley.api import build_router
from parley.fdlimit import OpenFilesGuard
from parley.health import Readiness, ServingState
from parley.observability import get_logger
from parley.startup import Components
from parley.supervisor.leases import InstanceLease
from parley.web import STATIC_DIR
from parley.web.security import SecurityHeaders

log = get_logger(__name__)

WATCHDOG_INTERVAL_S = 5.0
ORPHAN_SWEEP_EVERY = 12  # watchdog ticks (one minute)


def create_app(components: Components, state: ServingState | None = None) -> FastAPI:
    """The ASGI app over started components; `state` is shared with the signal handler."""
    state = state if state is not None else ServingState()
    readiness = Readiness(components, state)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Before the port opens. On SQLite this process is the only server of the file, so
        # every run still `running` was left by one that died. On a shared database a run is
        # an orphan when its instance's lease expired (supervisor/leases.py), or, for runs of
        # no known instance, when it is past its deadline (Supervisor.recover_orphans).
        lease = await _take_lease(components)
        await components.supervisor.recover_orphans(all_running=components.db.is_sqlite)
        renewing = None
        if lease is not None:
            await lease.sweep()
            renewing = _start(lease.run(), "instance-lease")
        watchdog = _start(_watchdog(components), "supervisor-watchdog")
        try:
            yield
        finally:
            await _stop(watchdog)
            try:
                await drain(components, state)
            finally:
                # Renewed through the drain (which can outlast a lease), given up after it.
                if lease is not None and renewing is not None:
                    await _give_up(lease, renewing)

    # The OpenAPI UI loads its assets from a CDN: development only (the schema is always there).
    development = components.settings.environment.value == "development"
    app = FastAPI(
        title="Parley",
        version=__version__,
        lifespan=lifespan,
        docs_url="/api/docs" if development else None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        is_ready, detail = await readiness.check()
        body = {"status": "ready" if is_ready else "not_ready", "components": detail}
        return JSONResponse(body, status_code=200 if is_ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(components.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.websocket("/ws")
    async def websocket(ws: WebSocket) -> None:
        await components.transport.handle(ws)

    app.include_router(
        build_router(authenticator=components.transport.authenticator, db=components.db)
    )
    # Last, so that every route above takes precedence over a static file of the same path.
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="web")
    app.add_middleware(SecurityHeaders, docs_path=app.docs_url)
    app.add_middleware(OpenFilesGuard, registry=components.metrics.registry)
    return app


async def drain(components: Components, state: ServingState) -> None:
    """Idempotent graceful stop of the serving parts (not of the components themselves)."""
    if state.draining:
        return
    state.draining = True
    log.info("shutdown.draining", runs=components.supervisor.active_runs)
    components.transport.stop_accepting()
    await components.supervisor.drain(components.settings.shutdown_grace_s)
    # The terminal events written by the drain must reach other instances before we go.
    await components.bus.flush(timeout_s=5.0)
    await components.transport.close_all()
    log.info("shutdown.drained")


async def _take_lease(components: Components) -> InstanceLease | None:
    """Register this instance's lease on a shared database (none on SQLite: one process)."""
    if components.db.is_sqlite:
        return None
    settings = components.settings
    lease = InstanceLease(
        db=components.db,
        supervisor=components.supervisor,
        instance_id=components.instance_id,
        heartbeat_s=settings.instance_heartbeat_s,
        lease_s=settings.instance_lease_s,
    )
    await lease.register()
    return lease


async def _give_up(lease: InstanceLease, renewing: asyncio.Task[None]) -> None:
    await _stop(renewing)
    try:
        await lease.release()
    except Exception as exc:
        # Harmless: peers declare this instance dead once its lease runs out by itself.
        log.warning("shutdown.lease_release_failed", error=type(exc).__name__)


def _start(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    return asyncio.create_task(coro, name=name)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _watchdog(components: Components) -> None:
    """Logs and exports when the supervisor stops accepting work; sweeps orphaned runs."""
    healthy = True
    tick = 0
    while True:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
        tick += 1
        writer_alive = all(not task.done() for task in components.tasks)
        now_healthy = components.supervisor.accepting and writer_alive
        components.metrics.supervisor_accepting.set(1 if now_healthy else 0)
        if now_healthy != healthy:
            healthy = now_healthy
            if healthy:
                log.info("watchdog.supervisor_recovered")
            else:
                log.error(
                    "watchdog.supervisor_not_accepting",
                    writer_alive=writer_alive,
                    accepting=components.supervisor.accepting,
                )
        if tick % ORPHAN_SWEEP_EVERY == 0:
            try:
                await components.supervisor.recover_orphans(all_running=False)
            except Exception:
                log.exception("watchdog.orphan_sweep_failed")


class ParleyServer(uvicorn.Server):
    """uvicorn's server with Parley's drain between the signal and uvicorn's own shutdown."""

    def __init__(
        self,
        config: uvicorn.Config,
        drain: Callable[[], Awaitable[None]],
        hurry: Callable[[], None],
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._hurry = hurry
        self._hurried = False
        self._draining: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after serving, and the
        # process would die of the signal instead of exiting 0 after a clean shutdown.
        if self._loop is None:
            self.should_exit = True
            return
        if self._draining is not None and not self._hurried:
            # A second signal: skip the grace wait, but still end every run with its terminal
            # event and close every socket with 1001 (a forced exit would lose both).
            self._hurried = True
            self._loop.call_soon_threadsafe(self._hurry)
            return
        if self._draining is not None:
            self.should_exit = self.force_exit = True  # a third: stop now
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        except Exception:
            log.exception("shutdown.drain_failed")
        finally:
            self.should_exit = True
