"""A streamed HTTP/1.1 POST whose response body is pushed to a callback as it arrives: how a
model request reaches a provider directly (through a proxy it goes through aiohttp, see
llm_http.py).

Why not aiohttp here: a model sends a token per network read, and aiohttp handles every read
with its payload parser feeding a StreamReader, a waiter future, a wake-up of the reading task
through the reader's coroutines, the read timeout re-armed twice and the transport resumed.
Measured with the benchmark's model (bench/README.md), ~33 µs of client CPU per token through
aiohttp and ~18 µs pushed from the protocol. The HTTP is parsed by httptools (llhttp, the
parser uvicorn serves with); what is ours is the connection pool, the request's head and the
timeouts, kept to what the aiohttp path did:
- getting a connection waits at most `timeout_s` for a free one, connecting at most
  `connect_timeout_s`;
- the response and each piece of its body must come within `timeout_s` of the last;
- connecting tries a host's addresses as aiohttp does (happy eyeballs, 250 ms apart), so a
  host whose IPv6 is broken is still reached over IPv4;
- a connection is kept for the next request when the response allows it (keep-alive) and was
  read to its end, for at most `KEEPALIVE_S` idle (aiohttp's figure); if the provider closed a
  kept connection just as the request went out, the request is sent again on a new one, once;
- interim responses (1xx) are skipped; anything after the response closes the connection.
Redirects are not followed here: the caller gets the 3xx (llm_http.py hands those to aiohttp).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Mapping

import aiohappyeyeballs
import httptools
import yarl

BodySink = Callable[[bytes], None]

KEEPALIVE_S = 15.0
HAPPY_EYEBALLS_DELAY_S = 0.25


def tls_context() -> ssl.SSLContext:
    """The context for https providers: the system's trust store, HTTP/1.1 offered by ALPN.
    Loading the trust store blocks (~40 ms), so make it once, at startup."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


class StreamPool:
    """Connections to one origin (scheme, host, port), at most `max_connections` in use."""

    def __init__(
        self,
        url: yarl.URL,
        *,
        headers: Mapping[str, str],
        timeout_s: float,
        connect_timeout_s: float,
        max_connections: int,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if url.scheme not in ("http", "https") or url.host is None:
            raise ValueError(f"not an http(s) URL: {url}")
        if url.scheme == "https" and tls is None:
            raise ValueError("an https URL needs a TLS context (see `tls_context`)")
        lines = [f"POST {url.raw_path_qs} HTTP/1.1", f"Host: {url.host_port_subcomponent}"]
        for name, value in headers.items():
            if any(c in f"{name}{value}" for c in "\r\n\0"):
                raise ValueError(f"header {name!r} holds a line break or NUL")
            lines.append(f"{name}: {value}")
        self._head = "\r\n".join(lines) + "\r\n"  # Content-Length and the blank line follow
        self._host = url.host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = tls if url.scheme == "https" else None
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_idle = max_connections
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[tuple[_Connection, float]] = []  # with when each went idle
        self._closed = False

    async def post(self, payload: bytes) -> StreamedResponse:
        """Send the request; returns once the response's status and headers are in. Raises
        OSError (connection failures) or TimeoutError."""
        async with asyncio.timeout(self._timeout_s):
            await self._slots.acquire()
        try:
            request = f"{self._head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload
            resent = False
            while True:
                connection, reused = await self._connection()
                exchange = _Exchange(connection, self._timeout_s)
                try:
                    connection.send(exchange, request)
                    await exchange.headers_in
                    return StreamedResponse(exchange, self._release)
                except ConnectionError:
                    exchange.close()
                    # A kept connection the provider closed as the request went out (its idle
                    # timeout): it answered nothing, so it is sent again on a new connection,
                    # once. Any other failure is the caller's to retry (with its backoff).
                    if resent or not (reused and exchange.nothing_received):
                        raise
                    resent = True
                except BaseException:
                    exchange.close()
                    raise
        except BaseException:
            self._slots.release()
            raise

    async def close(self) -> None:
        self._closed = True
        for connection, _since in self._idle:
            connection.abort()
        self._idle.clear()

    async def _connection(self) -> tuple[_Connection, bool]:
        stale = time.monotonic() - KEEPALIVE_S
        while self._idle:
            connection, since = self._idle.pop()
            if connection.usable and since > stale:
                return connection, True
            connection.abort()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout_s):
            addresses = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
            sock = await aiohappyeyeballs.start_connection(
                addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_S, interleave=1
            )
            try:
                _transport, connection = await loop.create_connection(
                    _Connection,
                    sock=sock,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
            except BaseException:
                sock.close()
                raise
        return connection, False

    def _release(self, exchange: _Exchange) -> None:
        self._slots.release()
        connection = exchange.connection
        if exchange.reusable and not self._closed and len(self._idle) < self._max_idle:
            connection.exchange = None
            self._idle.append((connection, time.monotonic()))
        else:
            connection.abort()


class StreamedResponse:
    """A response whose headers are in and whose body is still to come."""

    def __init__(self, exchange: _Exchange, release: Callable[[_Exchange], None]) -> None:
        self._exchange = exchange
        self._release: Callable[[_Exchange], None] | None = release
        self.status = exchange.status
        self.headers = exchange.headers

    async def stream(self, sink: BodySink) -> None:
        """Push the body to `sink` as it arrives; returns at its end. An exception `sink`
        raises ends the reading and is raised here; so are OSError and TimeoutError."""
        exchange = self._exchange
        exchange.set_sink(sink)
        await exchange.body_in

    async def read(self, limit: int) -> bytes:
        """The body, up to `limit` bytes (the rest is not read)."""
        pieces: list[bytes] = []
        size = 0

        def keep(data: bytes) -> None:
            nonlocal size
            pieces.append(data)
            size += len(data)
            if size >= limit:
                raise _Enough

        with contextlib.suppress(_Enough):
            await self.stream(keep)
        return b"".join(pieces)[:limit]

    def release(self) -> None:
        """Done with the response: its connection is kept if it was read to its end, else
        closed. Call once, also after a failure."""
        if self._release is not None:
            release, self._release = self._release, None
            self._exchange.close()
            release(self._exchange)


class _Enough(Exception):
    pass


class _Exchange:
    """One request and its response on a connection; the parser's callbacks land here."""

    def __init__(self, connection: _Connection, timeout_s: float) -> None:
        self.connection = connection
        self._loop = asyncio.get_running_loop()
        self.headers_in: asyncio.Future[None] = self._loop.create_future()
        self.body_in: asyncio.Future[None] = self._loop.create_future()
        self.status = 0
        self.headers: dict[str, str] = {}
        self._length_known = False  # Content-Length or chunked: else the body ends at close
        # The parser holds this exchange's callbacks, a reference cycle: `close` lets go of it.
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._sink: BodySink | None = None
        self._early: list[bytes] = []  # body that came before the sink
        self.nothing_received = True
        self._keep_alive = False  # read when the response ends (the parser forgets it then)
        self.complete = False
        self._failed = False
        # The read timeout, re-armed lazily: data only notes its time, and the timer, when
        # it fires, looks at how long ago that was.
        self._timeout_s = timeout_s
        self._last_data = self._loop.time()
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(
            self._last_data + timeout_s, self._check_timeout
        )

    @property
    def reusable(self) -> bool:
        return self.complete and self._keep_alive and self.connection.usable

    # ------------------------------------------------------------------ from the connection

    def data_received(self, data: bytes) -> None:
        if self.complete or self._parser is None:
            self._not_kept()  # more than the response, or after the reader let go
            return
        self._last_data = self._loop.time()
        self.nothing_received = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            pass  # the callback recorded its failure
        except httptools.HttpParserError as exc:
            self.fail(ConnectionResetError(f"the provider's response is not HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.headers_in.done() and not self._length_known and exc is None:
            self._finish()  # a body that ends when the connection does
        else:
            self.fail(exc or ConnectionResetError("the provider closed the connection"))

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            # A second response in the same read: nothing asked for it.
            self._not_kept()
            raise ConnectionResetError("the provider sent more than its response")
        self.headers = {}  # after an interim (1xx) response, the final one's headers
        self._length_known = False

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        self.headers[key] = value.decode("latin-1")
        if key == "content-length" or (key == "transfer-encoding" and b"chunked" in value):
            self._length_known = True

    def on_headers_complete(self) -> None:
        assert self._parser is not None  # called from its feed_data
        self.status = self._parser.get_status_code()
        if self.status < 200:
            return  # interim (100 Continue, 103 Early Hints): the final response follows
        if not self.headers_in.done():
            self.headers_in.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._failed or self.complete:
            return
        if self._sink is None:
            self._early.append(body)
            return
        try:
            self._sink(body)
        except BaseException as exc:
            self.fail(exc)
            raise  # stops the parser (httptools raises HttpParserCallbackError)

    def on_message_complete(self) -> None:
        if self.status < 200:
            return  # the end of an interim response
        assert self._parser is not None  # called from its feed_data
        self._keep_alive = self._parser.should_keep_alive()
        self._finish()

    # ------------------------------------------------------------------ the reader's side

    def set_sink(self, sink: BodySink) -> None:
        """From now on the body goes to `sink`, starting with what already came (an exception
        it raises on that is raised here)."""
        self._sink = sink
        early, self._early = self._early, []
        for body in early:
            sink(body)

    def fail(self, exc: BaseException) -> None:
        if self._failed or self.complete:
            return
        self._failed = True
        self._cancel_timer()
        self.connection.abort()
        for future in (self.headers_in, self.body_in):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: only one of them may be awaited

    def close(self) -> None:
        """The reader is done (or gone): a response not read to its end loses its
        connection."""
        self._cancel_timer()
        if not self.complete:
            self._failed = True
            self.connection.abort()
            for future in (self.headers_in, self.body_in):
                if not future.done():
                    future.cancel()
        # Freed now rather than by a garbage collection: the parser (which holds this exchange)
        # and the reader the body was pushed to, with all a run's streaming state it reaches.
        # Under load those collections took tens of milliseconds each, pauses every stream saw.
        self._parser = None
        self._sink = None

    # ------------------------------------------------------------------ helpers

    def _finish(self) -> None:
        if self._failed or self.complete:
            return
        self.complete = True
        self._cancel_timer()
        if not self.headers_in.done():
            self.headers_in.set_result(None)
        if not self.body_in.done():
            self.body_in.set_result(None)

    def _not_kept(self) -> None:
        self._keep_alive = False
        self.connection.abort()

    def _check_timeout(self) -> None:
        self._timer = None
        if self.complete or self._failed:
            return
        due = self._last_data + self._timeout_s
        if self._loop.time() >= due:
            self.fail(TimeoutError())
        else:
            self._timer = self._loop.call_at(due, self._check_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Connection(asyncio.Protocol):
    """A connection to the provider: hands what it reads to its current exchange."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.lost = False

    @property
    def usable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, exchange: _Exchange, request: bytes) -> None:
        if not self.usable:
            raise ConnectionResetError("the connection is closed")
        assert self.transport is not None
        self.exchange = exchange
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:
            self.abort()  # nothing was asked: a provider that talks out of turn is not kept
            return
        self.exchange.data_received(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.exchange is not None:
            self.exchange.connection_lost(exc)

    def abort(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()
