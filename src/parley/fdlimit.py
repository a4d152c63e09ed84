"""Open files: every connection is a file descriptor, and a process out of them cannot even
answer its health checks.

At startup `raise_open_files_limit` lifts the soft RLIMIT_NOFILE to the hard limit (the
soft default of 1024 under systemd and most shells holds about a thousand connections) and
logs the effective limit. While serving, `OpenFilesGuard` refuses a new WebSocket with HTTP
503 before the upgrade once the process is within `reserve` descriptors of the limit, so
the reserve stays free for health probes, metrics, the database and the language model.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from parley.observability import get_logger

log = get_logger(__name__)

# Below this many descriptors the server holds fewer connections than a small deployment needs.
LOW_LIMIT = 4096
SAMPLE_INTERVAL_S = 0.5
WARN_EVERY_S = 10.0  # a storm of refused handshakes is one log line per this many seconds
_FD_DIRS = (Path("/proc/self/fd"), Path("/dev/fd"))


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit as far as the hard limit allows; return the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit cannot be the soft one on Linux (it is capped by fs.nr_open).
    targets = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 1 << 16]
    for target in targets:
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            break
        except (ValueError, OSError):
            continue
    effective = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    reserve = reserve_for(effective)
    fields = {"soft": effective, "hard": hard, "was": soft, "reserve": reserve}
    if effective < LOW_LIMIT:
        log.warning("open_files.limit_low", **fields, hint="raise LimitNOFILE / ulimit -Hn")
    else:
        log.info("open_files.limit", **fields)
    return effective


def reserve_for(limit: int) -> int:
    """Descriptors kept free for everything but new WebSocket connections."""
    return max(64, min(limit // 16, 1024))


def count_open_files() -> int | None:
    """How many descriptors this process has open (None where the OS does not say)."""
    for directory in _FD_DIRS:
        try:
            return len(os.listdir(directory)) - 1  # minus the one listdir itself opened
        except OSError:
            continue
    return None


class OpenFilesGuard:
    """Pure ASGI middleware: refuses WebSocket handshakes near the open-files limit.

    The count is sampled (in a worker thread, at most every `SAMPLE_INTERVAL_S`) and advanced
    by each connection admitted since, so a burst of handshakes cannot overshoot between
    samples. HTTP requests are never refused here: they are what the reserve is for.
    """

    def __init__(self, app: ASGIApp, *, registry: CollectorRegistry) -> None:
        self.app = app
        self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.reserve = reserve_for(self.limit)
        self._sampled: int | None = None
        self._sampled_at = float("-inf")
        self._admitted_since = 0
        self._lock = asyncio.Lock()
        self._warned_at = float("-inf")
        self._refused_since_warning = 0
        Gauge("parley_open_files_limit", "The soft open-files limit", registry=registry).set(
            self.limit
        )
        self._open_files = Gauge(
            "parley_open_files",
            "Open file descriptors, sampled at WebSocket handshakes",
            registry=registry,
        )
        self._refused = Counter(
            "parley_websocket_refused",
            "WebSocket handshakes refused with 503 because the process is near its limit",
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and await self._near_limit():
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _near_limit(self) -> bool:
        if time.monotonic() - self._sampled_at > SAMPLE_INTERVAL_S:
            async with self._lock:
                if time.monotonic() - self._sampled_at > SAMPLE_INTERVAL_S:
                    self._sampled = await asyncio.to_thread(count_open_files)
                    self._sampled_at = time.monotonic()
                    self._admitted_since = 0
                    if self._sampled is not None:
                        self._open_files.set(self._sampled)
        if self._sampled is None:
            return False
        if self._sampled + self._admitted_since >= self.limit - self.reserve:
            return True
        self._admitted_since += 1
        return False

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._refused.inc()
        self._refused_since_warning += 1
        if time.monotonic() - self._warned_at >= WARN_EVERY_S:
            log.warning(
                "open_files.websocket_refused",
                refused=self._refused_since_warning,
                open_files=self._sampled,
                limit=self.limit,
                reserve=self.reserve,
            )
            self._warned_at = time.monotonic()
            self._refused_since_warning = 0
        await receive()  # websocket.connect
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1013})  # the server answers 403
            return
        body = json.dumps(
            {"detail": "the server is at its connection capacity; retry later"}
        ).encode()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", b"5"),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
