"""The WebSocket endpoint `/ws`: handshake and authentication, heartbeat, frame limits,
parsing, and delivery through a bounded per-connection send queue.

Invariants:
- nothing but `error unauthorized` is sent before authentication succeeds;
- one slow client never stalls a run or other clients: events are only *enqueued* for a
  connection; a connection whose queue overflows is closed (1013) and can `resume`;
- on one connection each run event is sent at most once and in `seq` order per thread;
- nothing is queued for a connection after its token's `exp`: it is closed with 4401 then,
  unless the client replaced the token (`authenticate`) with a newer one of the same user.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from parley import __version__
from parley.auth import Authenticator
from parley.bus import EventBus
from parley.counters import PerUserCounter
from parley.delivery import (
    RESUME_HOLD_S,
    WRITE_TEXT_EXTENSION,
    Close,
    ConnectionDelivery,
    Outbox,
    Overflow,
)
from parley.errors import NotFound, ParleyError
from parley.observability import Metrics, get_logger
from parley.protocol import (
    PROTOCOL_VERSION,
    Authenticate,
    Authenticated,
    ErrorFrame,
    MessageAccepted,
    Ping,
    PingFrame,
    Pong,
    PongFrame,
    ProtocolViolation,
    Resume,
    StopAgent,
    SystemMessage,
    UserMessage,
    parse_client_message,
    utc_iso,
)
from parley.store import queries
from parley.store.db import Database
from parley.store.outage import is_transient
from parley.supervisor import Accepted, Supervisor

log = get_logger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_TOO_LARGE = 1009
CLOSE_INTERNAL = 1011
# The client fell too far behind, or the event bus was cut off for too long: reconnect and
# resume (see docs/protocol.md).
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_UNAUTHORIZED = 4401
CLOSE_ORIGIN = 4403
CLOSE_HEARTBEAT = 4408
CLOSE_TOO_MANY = 4429
_BEARER_PREFIX = "bearer."
_KEPT = "; the connection keeps its current token"


@dataclass(frozen=True)
class TransportConfig:
    heartbeat_interval_s: float
    max_message_bytes: int
    max_connections_per_user: int
    send_queue_size: int
    allowed_origins: frozenset[str]
    model_label: str


@dataclass(eq=False)  # identity hashing: connections live in a set
class _Connection:
    id: str
    user_id: str
    ws: WebSocket
    delivery: ConnectionDelivery
    token_expires_at: float  # the current token's `exp`, seconds since the epoch
    last_received: float = field(default_factory=time.monotonic)
    expiry: asyncio.TimerHandle | None = None
    closing: Close | None = None  # the first close queued, sent or not

    def enqueue(self, frame: str | Close) -> None:
        """Queue a frame that is not a run event (errors, pongs, acknowledgements)."""
        if isinstance(frame, Close) and self.closing is None and not self.delivery.outbox.closed:
            self.closing = frame
        try:
            self.delivery.outbox.put(frame)
        except Overflow:
            self.delivery.overflowed.set()


class Transport:
    def __init__(
        self,
        *,
        config: TransportConfig,
        authenticator: Authenticator,
        supervisor: Supervisor,
        bus: EventBus,
        db: Database,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._auth = authenticator
        self._supervisor = supervisor
        self._bus = bus
        self._db = db
        self._metrics = metrics
        self._per_user = PerUserCounter()
        self._connections: set[_Connection] = set()
        self._none_open = asyncio.Event()
        self._none_open.set()
        self._accepting = True
        # A stalled client gets one more heartbeat interval to take its close frame.
        self._close_within_s = config.heartbeat_interval_s
        bus.on_reconnect(self._catch_up)
        bus.on_outage(self._bus_outage)

    @property
    def authenticator(self) -> Authenticator:
        return self._auth

    def stop_accepting(self) -> None:
        """Shutdown began: connections that complete their handshake now are closed (1001)."""
        self._accepting = False

    def _catch_up(self) -> None:
        for connection in self._connections:
            connection.delivery.catch_up()

    def _bus_outage(self) -> None:
        """Redis has been unreachable for longer than its grace: events of runs on other
        instances cannot arrive, and no later event will reveal the gap. Say so rather than
        leave clients waiting: what is queued is sent, then 1013; a client that reconnects and
        resumes gets everything from the store."""
        for connection in self._connections:
            connection.enqueue(Close(CLOSE_TRY_AGAIN_LATER, "event bus unavailable; resume"))

    # ------------------------------------------------------------------ handshake

    async def handle(self, ws: WebSocket) -> None:
        origin = ws.headers.get("origin")
        offered = [p.strip() for p in ws.scope.get("subprotocols", [])]
        subprotocol = PROTOCOL_VERSION if PROTOCOL_VERSION in offered else None
        if self._config.allowed_origins and origin and origin not in self._config.allowed_origins:
            await ws.accept(subprotocol=subprotocol)
            await ws.close(CLOSE_ORIGIN, "origin not allowed")
            return
        token = _bearer_token(ws.headers.get("authorization"), offered)
        await ws.accept(subprotocol=subprotocol)
        try:
            if token is None:
                raise ParleyError("no bearer token", code="unauthorized")
            identity = await self._auth.authenticate(token)
        except ParleyError as exc:
            await ws.send_text(ErrorFrame(code="unauthorized", message=exc.message).to_json())
            await ws.close(CLOSE_UNAUTHORIZED, "unauthorized")
            return
        user_id = identity.user_id
        if not self._accepting:
            await _close(
                ws, CLOSE_GOING_AWAY, "server shutting down", within_s=self._close_within_s
            )
            return
        if self._per_user[user_id] >= self._config.max_connections_per_user:
            await ws.close(CLOSE_TOO_MANY, "too many connections for this user")
            return
        connection = _Connection(
            id=str(uuid.uuid4()),
            user_id=user_id,
            ws=ws,
            delivery=ConnectionDelivery(
                Outbox(
                    self._config.send_queue_size,
                    write_now=ws.scope.get("extensions", {}).get(WRITE_TEXT_EXTENSION),
                ),
                self._read_page,
                holding=True,
            ),
            token_expires_at=identity.expires_at,
        )
        self._per_user.add(user_id)
        self._connections.add(connection)
        self._none_open.clear()
        self._metrics.connections.set(len(self._connections))
        try:
            await self._serve(connection)
        finally:
            self._connections.discard(connection)
            if not self._connections:
                self._none_open.set()
            self._per_user.remove(user_id)
            self._metrics.connections.set(len(self._connections))

    async def _serve(self, connection: _Connection) -> None:
        connection.enqueue(
            SystemMessage(
                connection_id=connection.id,
                user_id=connection.user_id,
                server_version=__version__,
                heartbeat_interval_s=self._config.heartbeat_interval_s,
                model=self._config.model_label,
                token_expires_at=_iso(connection.token_expires_at),
            ).to_json()
        )
        delivery = connection.delivery
        subscription = await self._bus.subscribe(connection.user_id, delivery.deliver)
        try:
            release = asyncio.get_running_loop().call_later(RESUME_HOLD_S, delivery.release_held)
            self._expire_at(connection, connection.token_expires_at)
            tasks = [
                asyncio.create_task(self._receive(connection), name="ws-receive"),
                asyncio.create_task(self._send(connection), name="ws-send"),
                asyncio.create_task(self._heartbeat(connection), name="ws-heartbeat"),
                asyncio.create_task(delivery.replay_forever(), name="ws-replay"),
                asyncio.create_task(delivery.overflowed.wait(), name="ws-overflow"),
            ]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                release.cancel()
                if connection.expiry is not None:
                    connection.expiry.cancel()
                for task in tasks:
                    task.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
            failed = False
            for task, result in zip(tasks, results, strict=True):
                if isinstance(result, Exception):
                    failed = True
                    log.error(
                        "transport.connection_task_failed",
                        connection_id=connection.id,
                        task=task.get_name(),
                        error=type(result).__name__,
                        detail=str(result)[:200],
                    )
            if delivery.overflowed.is_set():
                self._metrics.send_queue_overflows.inc()
                log.warning("transport.send_queue_overflow", connection_id=connection.id)
                await _close(
                    connection.ws,
                    CLOSE_TRY_AGAIN_LATER,
                    "client too slow; resume",
                    within_s=self._close_within_s,
                )
            elif connection.closing is not None:
                # A close (too large, heartbeat, expiry) that the sender did not get to: first
                # the frames queued before it (e.g. the `message_too_large` error), then the
                # close, each bounded: a stalled client must not hold its connection forever.
                closing = connection.closing
                await _send_within(
                    connection.ws,
                    delivery.outbox.take_before_close(),
                    within_s=self._close_within_s,
                )
                await _close(
                    connection.ws, closing.code, closing.reason, within_s=self._close_within_s
                )
            elif failed:
                # Without this the client would see the socket drop (1006) and not know why.
                await _close(
                    connection.ws, CLOSE_INTERNAL, "internal error", within_s=self._close_within_s
                )
        finally:
            await subscription.close()

    # ------------------------------------------------------------------ the three loops

    async def _send(self, connection: _Connection) -> None:
        while True:
            item = await connection.delivery.outbox.get()
            if isinstance(item, Close):
                await _close(connection.ws, item.code, item.reason, within_s=self._close_within_s)
                return
            try:
                await connection.ws.send_text(item)
            except (WebSocketDisconnect, RuntimeError, OSError):
                return
            except asyncio.CancelledError:
                # Stopped while the client was not reading (its send waits for room before it
                # writes anything): the frame goes first among those still to send, so a close
                # that flushes them (heartbeat, expiry) does not skip it.
                connection.delivery.outbox.put_back(item)
                raise

    async def _heartbeat(self, connection: _Connection) -> None:
        interval = self._config.heartbeat_interval_s
        # Check often enough that a silent client is closed soon after two intervals.
        tick = max(0.05, min(1.0, interval / 4))
        last_ping = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - connection.last_received > 2 * interval:
                connection.enqueue(Close(CLOSE_HEARTBEAT, "heartbeat timeout"))
                return
            if now - last_ping >= interval:
                last_ping = now
                connection.enqueue(PingFrame().to_json())

    async def _receive(self, connection: _Connection) -> None:
        while True:
            try:
                message = await connection.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            connection.last_received = time.monotonic()
            text = message.get("text")
            if text is None:
                self._error(connection, "invalid_message", "binary frames are not accepted")
                continue
            if len(text) > self._config.max_message_bytes or (
                len(text.encode()) > self._config.max_message_bytes
            ):
                limit = self._config.max_message_bytes
                self._error(connection, "message_too_large", f"frames are limited to {limit} bytes")
                connection.enqueue(Close(CLOSE_TOO_LARGE, "message too large"))
                return
            try:
                await self._dispatch(connection, text)
            except ProtocolViolation as exc:
                self._error(connection, exc.code, exc.message)

    # ------------------------------------------------------------------ client messages

    async def _dispatch(self, connection: _Connection, text: str) -> None:
        message = parse_client_message(text)
        if isinstance(message, Ping):
            connection.enqueue(PongFrame().to_json())
        elif isinstance(message, Pong):
            return
        elif isinstance(message, UserMessage):
            await self._user_message(connection, message)
        elif isinstance(message, StopAgent):
            with self._answering_failures(connection):
                await self._supervisor.stop(connection.user_id, message.run_id)
        elif isinstance(message, Resume):
            with self._answering_failures(connection):
                await self._resume(connection, message)
        elif isinstance(message, Authenticate):
            await self._authenticate(connection, message)

    @contextlib.contextmanager
    def _answering_failures(self, connection: _Connection) -> Iterator[None]:
        """A refused request is answered with its error frame; a database that cannot be
        reached right now with `unavailable` (retry), not a closed connection."""
        try:
            yield
        except ParleyError as exc:
            self._error(connection, exc.code, exc.message)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("transport.database_unavailable", error=type(exc).__name__)
            self._error(connection, "unavailable", "the database is unavailable; retry")

    # ------------------------------------------------------------------ token lifetime

    async def _authenticate(self, connection: _Connection, message: Authenticate) -> None:
        """Replace the connection's token. A refused token changes nothing: the connection
        keeps its old token, and with it its old expiry."""
        try:
            identity = await self._auth.authenticate(message.token)
        except ParleyError as exc:
            self._error(connection, "unauthorized", f"token refused: {exc.message}{_KEPT}")
            return
        except Exception:
            log.exception("transport.authenticate_failed", connection_id=connection.id)
            self._error(connection, "unavailable", "the token could not be checked now; retry")
            return
        if identity.user_id != connection.user_id:
            # One connection is one user for its whole life (its subscriptions, its limits):
            # switching users takes a new connection.
            self._error(
                connection,
                "unauthorized",
                f"token refused: it is for another user ('sub' differs){_KEPT}; "
                "open a new connection to switch users",
            )
            return
        self._expire_at(connection, identity.expires_at)
        connection.enqueue(
            Authenticated(
                user_id=identity.user_id, token_expires_at=_iso(identity.expires_at)
            ).to_json()
        )

    def _expire_at(self, connection: _Connection, expires_at: float) -> None:
        if connection.expiry is not None:
            connection.expiry.cancel()
        connection.token_expires_at = expires_at
        delay = max(0.0, expires_at - time.time())
        connection.expiry = asyncio.get_running_loop().call_later(
            delay, self._token_expired, connection
        )

    def _token_expired(self, connection: _Connection) -> None:
        log.info("transport.token_expired", connection_id=connection.id)
        self._error(connection, "unauthorized", "token expired")
        connection.enqueue(Close(CLOSE_UNAUTHORIZED, "token expired"))

    async def _user_message(self, connection: _Connection, message: UserMessage) -> None:
        def accepted(result: Accepted) -> None:
            connection.delivery.claim(result.thread_id)
            connection.enqueue(
                MessageAccepted(
                    client_message_id=result.client_message_id,
                    thread_id=result.thread_id,
                    message_id=result.message_id,
                    run_id=result.run_id,
                ).to_json()
            )

        try:
            await self._supervisor.submit(connection.user_id, message, accepted)
        except ParleyError as exc:
            self._error(connection, exc.code, exc.message, message.client_message_id)
        except Exception:
            log.exception("transport.submit_failed", user_id=connection.user_id)
            self._error(
                connection,
                "unavailable",
                "the message could not be stored; retry",
                message.client_message_id,
            )

    async def _resume(self, connection: _Connection, message: Resume) -> None:
        """Check the thread is the user's, then queue its replay (the receive loop goes on:
        the connection's replay worker pulls the events as the client takes them)."""
        # Before any await: live events arriving during the check must not overtake the replay.
        connection.delivery.begin_resume(message.thread_id)
        try:
            async with self._db.read() as session:
                thread = await queries.get_thread(
                    session, user_id=connection.user_id, thread_id=message.thread_id
                )
        except BaseException:
            connection.delivery.abandon_resume(message.thread_id)
            raise
        if thread is None:
            connection.delivery.abandon_resume(message.thread_id)
            raise NotFound(f"thread {message.thread_id} not found")
        connection.delivery.resume(message.thread_id, message.after_seq)

    async def _read_page(self, thread_id: str, after_seq: int, limit: int) -> list[tuple[int, str]]:
        async with self._db.read() as session:
            rows = await queries.events_after(
                session, thread_id=thread_id, after_seq=after_seq, limit=limit
            )
            return [(row.seq, row.frame) for row in rows]

    def _error(
        self, connection: _Connection, code: str, message: str, client_message_id: str | None = None
    ) -> None:
        connection.enqueue(
            ErrorFrame(code=code, message=message, client_message_id=client_message_id).to_json()
        )

    # ------------------------------------------------------------------ shutdown

    async def close_all(self, *, timeout_s: float = 5.0) -> None:
        """Flush what each connection has queued, then close it with 1001."""
        for connection in list(self._connections):
            connection.enqueue(Close(CLOSE_GOING_AWAY, "server shutting down"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._none_open.wait()


def _bearer_token(authorization: str | None, subprotocols: list[str]) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for protocol in subprotocols:
        if protocol.startswith(_BEARER_PREFIX) and len(protocol) > len(_BEARER_PREFIX):
            return protocol[len(_BEARER_PREFIX) :]
    return None


# The last second `datetime` can show; a token may name a later `exp` (it is valid JSON).
_LATEST = datetime.max.replace(tzinfo=UTC).timestamp() - 86400


def _iso(epoch_seconds: float) -> str:
    return utc_iso(datetime.fromtimestamp(min(epoch_seconds, _LATEST), UTC))


async def _send_within(ws: WebSocket, frames: list[str], *, within_s: float) -> None:
    """Send `frames` in order, giving up after `within_s` (a client that does not read)."""
    if not frames or ws.application_state != WebSocketState.CONNECTED:
        return
    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect, TimeoutError):
        async with asyncio.timeout(within_s):
            for frame in frames:
                await ws.send_text(frame)


async def _close(ws: WebSocket, code: int, reason: str, *, within_s: float) -> None:
    """Close with `code`, giving up after `within_s`: the close frame waits behind everything
    the client has not read, and a client that never reads must not hold its connection (and
    its place among the user's connections) forever."""
    if ws.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect, TimeoutError):
            async with asyncio.timeout(within_s):
                await ws.close(code, reason)
