"""Delivery of persisted run events to every connection of their user.

The event log in the store is the source of truth; the bus only delivers. `InProcessBus` is the
embedded default. `RedisBus` publishes each event on a per-user channel, so that a run on
instance A reaches the same user's connections on instance B; each instance subscribes to the
channels of the users connected to it and fans out locally exactly as the in-process bus does.

`publish` never waits: the event log calls it right after a commit, and a slow or absent Redis
must not stall the writes of every run. An instance's own connections get its events directly
(never through Redis), so they do not depend on Redis at all. Redis pub/sub delivers at most
once: what a blip drops, each connection fetches from the store (see `on_reconnect` and the
transport's gap filling). An outage longer than `outage_grace_s` is announced (`on_outage`):
connections are then closed so that their clients reconnect and resume rather than wait for
events of other instances that cannot arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import redis.asyncio as aioredis

from parley.observability import get_logger

log = get_logger(__name__)


class Delivery(NamedTuple):
    user_id: str
    thread_id: str
    seq: int
    frame: str  # the JSON text sent on the wire


Sink = Callable[[Delivery], None]
# Control messages between instances (e.g. "stop run R of user U"), as small JSON objects.
ControlHandler = Callable[[dict[str, str]], None]
# Called after the bus was cut off from other instances and is back: what was published
# meanwhile was not delivered, and connections must fetch it from the store.
ReconnectHandler = Callable[[], None]
# Called once per outage, when the bus has been cut off for longer than its grace.
OutageHandler = Callable[[], None]


class Subscription(Protocol):
    async def close(self) -> None: ...


class EventBus(Protocol):
    name: str
    # Whether other Parley instances publish and listen on this bus too.
    spans_instances: bool

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def subscribe(self, user_id: str, sink: Sink) -> Subscription: ...
    def publish(self, deliveries: Sequence[Delivery]) -> None: ...
    async def flush(self, timeout_s: float) -> None: ...
    def on_control(self, handler: ControlHandler) -> None: ...
    def on_reconnect(self, handler: ReconnectHandler) -> None: ...
    def on_outage(self, handler: OutageHandler) -> None: ...
    async def publish_control(self, message: dict[str, str]) -> None: ...


class _LocalFanout:
    """Per-user sets of sinks. Sinks must not block: each one only enqueues."""

    def __init__(self) -> None:
        self._sinks: dict[str, set[Sink]] = {}

    def add(self, user_id: str, sink: Sink) -> bool:
        """Returns True when this is the user's first local sink."""
        sinks = self._sinks.setdefault(user_id, set())
        sinks.add(sink)
        return len(sinks) == 1

    def remove(self, user_id: str, sink: Sink) -> bool:
        """Returns True when the user has no local sink left."""
        sinks = self._sinks.get(user_id)
        if sinks is None:
            return False
        sinks.discard(sink)
        if not sinks:
            del self._sinks[user_id]
            return True
        return False

    def deliver(self, delivery: Delivery) -> None:
        for sink in tuple(self._sinks.get(delivery.user_id, ())):
            try:
                sink(delivery)
            except Exception:
                # One broken connection must not stop delivery to the others.
                log.exception("bus.sink_failed", user_id=delivery.user_id)


class _LocalSubscription:
    def __init__(self, on_close: Callable[[], object]) -> None:
        self._on_close = on_close
        self._closed = False

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            result = self._on_close()
            if asyncio.iscoroutine(result):
                await result


class InProcessBus:
    name = "in_process"
    spans_instances = False

    def __init__(self) -> None:
        self._fanout = _LocalFanout()
        self._control: list[ControlHandler] = []

    def on_control(self, handler: ControlHandler) -> None:
        self._control.append(handler)

    async def publish_control(self, message: dict[str, str]) -> None:
        for handler in self._control:
            handler(message)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    def on_reconnect(self, handler: ReconnectHandler) -> None:
        return None  # never cut off

    def on_outage(self, handler: OutageHandler) -> None:
        return None

    async def subscribe(self, user_id: str, sink: Sink) -> Subscription:
        self._fanout.add(user_id, sink)
        return _LocalSubscription(lambda: self._fanout.remove(user_id, sink))

    def publish(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self._fanout.deliver(delivery)

    async def flush(self, timeout_s: float) -> None:
        return None


_CHANNEL_PREFIX = "parley:events:"
_CONTROL_CHANNEL = "parley:control"


class RedisBus:
    name = "redis"
    spans_instances = True

    def __init__(self, url: str, *, instance_id: str = "", outage_grace_s: float = 10.0) -> None:
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=10, health_check_interval=30
        )
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._origin = instance_id or uuid.uuid4().hex
        self._fanout = _LocalFanout()
        self._control: list[ControlHandler] = []
        self._reconnect: list[ReconnectHandler] = []
        self._outage: list[OutageHandler] = []
        self._outage_grace_s = outage_grace_s
        # Channels this instance wants, and those Redis has confirmed; the reader subscribes
        # the difference (a SUBSCRIBE that failed, e.g. during a blip, is retried there).
        self._wanted: set[str] = set()
        self._subscribed: set[str] = set()
        self._outbox: asyncio.Queue[list[Delivery]] = asyncio.Queue()
        self._unpublished = 0
        self._published = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()

    def on_control(self, handler: ControlHandler) -> None:
        self._control.append(handler)

    def on_reconnect(self, handler: ReconnectHandler) -> None:
        self._reconnect.append(handler)

    def on_outage(self, handler: OutageHandler) -> None:
        self._outage.append(handler)

    async def publish_control(self, message: dict[str, str]) -> None:
        await self._client.publish(_CONTROL_CHANNEL, json.dumps(message))

    async def start(self) -> None:
        await self._client.ping()
        # Always subscribed to the control channel (a pub/sub connection with no channel
        # could not be read from anyway).
        await self._pubsub.subscribe(_CONTROL_CHANNEL)
        self._tasks = [
            asyncio.create_task(self._read_forever(), name="redis-bus-reader"),
            asyncio.create_task(self._publish_forever(), name="redis-bus-publisher"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._client.aclose()

    async def ping(self) -> None:
        await self._client.ping()
        if not self._tasks or any(task.done() for task in self._tasks):
            raise ConnectionError("the Redis subscriber is not running")

    async def subscribe(self, user_id: str, sink: Sink) -> Subscription:
        channel = _CHANNEL_PREFIX + user_id
        async with self._lock:
            if self._fanout.add(user_id, sink):
                self._wanted.add(channel)
                try:
                    await self._pubsub.subscribe(channel)
                    self._subscribed.add(channel)
                except (ConnectionError, OSError, aioredis.RedisError):
                    # Local events still arrive (they bypass Redis); the reader retries.
                    log.warning("bus.redis_subscribe_failed; will retry", user_id=user_id)

        async def unsubscribe() -> None:
            async with self._lock:
                if self._fanout.remove(user_id, sink):
                    self._wanted.discard(channel)
                    if channel in self._subscribed:
                        self._subscribed.discard(channel)
                        with contextlib.suppress(ConnectionError, OSError, aioredis.RedisError):
                            await self._pubsub.unsubscribe(channel)

        return _LocalSubscription(unsubscribe)

    def publish(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        for delivery in deliveries:
            self._fanout.deliver(delivery)
        self._unpublished += 1
        self._published.clear()
        self._outbox.put_nowait(list(deliveries))

    async def flush(self, timeout_s: float) -> None:
        """Wait (bounded) until everything handed to `publish` has gone to Redis."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._unpublished:
                    await self._published.wait()

    async def _publish_forever(self) -> None:
        while True:
            batch = await self._outbox.get()
            while not self._outbox.empty() and len(batch) < 1000:
                batch.extend(self._outbox.get_nowait())
                self._unpublished -= 1
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for d in batch:
                        pipe.publish(
                            _CHANNEL_PREFIX + d.user_id,
                            f"{self._origin}\n{d.thread_id}\n{d.seq}\n{d.frame}",
                        )
                    await pipe.execute()
            except Exception:
                # Stored, delivered locally, not delivered to other instances: their
                # connections fetch these from the store (gap filling, resume).
                log.warning("bus.redis_publish_failed", events=len(batch))
            finally:
                self._unpublished -= 1
                if self._unpublished == 0:
                    self._published.set()

    async def _read_forever(self) -> None:
        cut_off_since: float | None = None
        announced = False
        while True:
            try:
                await self._subscribe_missing()
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                now = time.monotonic()
                if cut_off_since is None:
                    cut_off_since = now
                    log.warning("bus.redis_read_failed; retrying", error=type(exc).__name__)
                elif not announced and now - cut_off_since >= self._outage_grace_s:
                    announced = True
                    log.error("bus.redis_outage_outlasted_grace", grace_s=self._outage_grace_s)
                    _call_each(self._outage, "bus.outage_handler_failed")
                self._subscribed.clear()  # redis-py resubscribes on reconnect; we check
                await asyncio.sleep(0.5)
                continue
            if cut_off_since is not None:
                cut_off_since, announced = None, False
                log.info("bus.redis_reconnected")
                _call_each(self._reconnect, "bus.reconnect_handler_failed")
            if message is None or message.get("type") != "message":
                continue
            try:
                self._dispatch(message)
            except Exception:
                log.exception("bus.redis_dispatch_failed")

    async def _subscribe_missing(self) -> None:
        missing = self._wanted - self._subscribed
        if missing:
            await self._pubsub.subscribe(*missing)
            self._subscribed.update(missing)

    def _dispatch(self, message: dict[str, object]) -> None:
        channel = _decode(message["channel"])  # type: ignore[arg-type]
        data = _decode(message["data"])  # type: ignore[arg-type]
        if channel == _CONTROL_CHANNEL:
            self._dispatch_control(data)
            return
        origin, thread_id, seq, frame = data.split("\n", 3)
        if origin == self._origin:
            return  # delivered locally when it was published
        user_id = channel.removeprefix(_CHANNEL_PREFIX)
        self._fanout.deliver(Delivery(user_id, thread_id, int(seq), frame))

    def _dispatch_control(self, data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("bus.bad_control_message")
            return
        for handler in self._control:
            try:
                handler(message)
            except Exception:
                log.exception("bus.control_handler_failed")


def _call_each(handlers: list[Callable[[], None]], failure_event: str) -> None:
    for handler in handlers:
        try:
            handler()
        except Exception:
            log.exception(failure_event)


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
