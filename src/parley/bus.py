"""Delivery of persisted run events to every connection of their user.

The event log in the store is the source of truth; the bus only delivers. `InProcessBus` is the
embedded default. `RedisBus` publishes each event on a per-user channel, so that a run on
instance A reaches the same user's connections on instance B; each instance subscribes to the
channels of the users connected to it and fans out locally exactly as the in-process bus does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
    async def publish(self, deliveries: Sequence[Delivery]) -> None: ...
    def on_control(self, handler: ControlHandler) -> None: ...
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

    async def subscribe(self, user_id: str, sink: Sink) -> Subscription:
        self._fanout.add(user_id, sink)
        return _LocalSubscription(lambda: self._fanout.remove(user_id, sink))

    async def publish(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self._fanout.deliver(delivery)


_CHANNEL_PREFIX = "parley:events:"
_CONTROL_CHANNEL = "parley:control"


class RedisBus:
    name = "redis"
    spans_instances = True

    def __init__(self, url: str) -> None:
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=10, health_check_interval=30
        )
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._fanout = _LocalFanout()
        self._control: list[ControlHandler] = []
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def on_control(self, handler: ControlHandler) -> None:
        self._control.append(handler)

    async def publish_control(self, message: dict[str, str]) -> None:
        await self._client.publish(_CONTROL_CHANNEL, json.dumps(message))

    async def start(self) -> None:
        await self._client.ping()
        # Always subscribed to the control channel (a pub/sub connection with no channel
        # could not be read from anyway).
        await self._pubsub.subscribe(_CONTROL_CHANNEL)
        self._reader = asyncio.create_task(self._read_forever(), name="redis-bus-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._client.aclose()

    async def ping(self) -> None:
        await self._client.ping()
        if self._reader is None or self._reader.done():
            raise ConnectionError("the Redis subscriber is not running")

    async def subscribe(self, user_id: str, sink: Sink) -> Subscription:
        async with self._lock:
            if self._fanout.add(user_id, sink):
                await self._pubsub.subscribe(_CHANNEL_PREFIX + user_id)

        async def unsubscribe() -> None:
            async with self._lock:
                if self._fanout.remove(user_id, sink):
                    await self._pubsub.unsubscribe(_CHANNEL_PREFIX + user_id)

        return _LocalSubscription(unsubscribe)

    async def publish(self, deliveries: Sequence[Delivery]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for d in deliveries:
                pipe.publish(_CHANNEL_PREFIX + d.user_id, f"{d.thread_id}\n{d.seq}\n{d.frame}")
            await pipe.execute()

    async def _read_forever(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (ConnectionError, OSError, aioredis.RedisError):
                log.warning("bus.redis_read_failed; retrying")
                await asyncio.sleep(0.5)
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = _decode(message["channel"])
            if channel == _CONTROL_CHANNEL:
                self._dispatch_control(_decode(message["data"]))
                continue
            thread_id, seq, frame = _decode(message["data"]).split("\n", 2)
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


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
