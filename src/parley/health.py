"""Readiness: checks each component for real, with a short timeout, cached for a second so a
busy load balancer cannot turn probes into load. Not ready while draining or when any
component is down; the body says which.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from parley.startup import Components

CHECK_TIMEOUT_S = 1.0
CACHE_S = 1.0


@dataclass
class ServingState:
    draining: bool = False


class Readiness:
    def __init__(self, components: Components, state: ServingState) -> None:
        self._c = components
        self._state = state
        self._cached: tuple[float, bool, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> tuple[bool, dict[str, Any]]:
        async with self._lock:
            now = time.monotonic()
            cached = self._cached
            # Draining turns readiness off at once: a cached "ready" must not outlive SIGTERM.
            stale_ready = cached is not None and self._state.draining and cached[1]
            if cached is not None and now - cached[0] < CACHE_S and not stale_ready:
                return cached[1], cached[2]
            components = {
                "database": await _probe(
                    self._c.db.ping, backend=self._c.db.url.get_backend_name()
                ),
                "event_bus": await _probe(self._c.bus.ping, backend=self._c.bus.name),
                "llm": self._c.llm.readiness(),
                "tools": {"status": "ok", "tools": self._c.tools.names},
                "supervisor": self._supervisor(),
            }
            ready = not self._state.draining and all(
                c["status"] != "down" for c in components.values()
            )
            self._cached = (now, ready, components)
            return ready, components

    def _supervisor(self) -> dict[str, Any]:
        detail = self._c.supervisor.readiness()
        writer_alive = all(not task.done() for task in self._c.tasks)
        detail["event_log_writer"] = "running" if writer_alive else "stopped"
        if self._state.draining:
            detail.update(status="down", reason="shutting down")
        elif not writer_alive:
            detail["status"] = "down"
        return detail


async def _probe(check: Callable[[], Awaitable[None]], **detail: Any) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await check()
    except Exception as exc:
        return {"status": "down", "error": type(exc).__name__, **detail}
    return {
        "status": "ok",
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
        **detail,
    }
