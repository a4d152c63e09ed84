"""The model request's HTTP client against a real server on loopback, scripted byte by byte:
how the body is pushed, when a connection is kept, and how each failure is reported."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import yarl

from parley.http_stream import StreamedResponse, StreamPool

# What the scripted server does with one request on a connection: it gets the connection's
# request count (1 for the first) and the writer.
Answer = Callable[[int, asyncio.StreamWriter], Awaitable[None]]


class Server:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        count = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":", 1)[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                )
                self.requests.append(head + await reader.readexactly(length))
                count += 1
                await self.answer(count, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return  # the client went away, or the test ended
        finally:
            writer.close()


def chunked(*pieces: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"


async def answer_ok(count: int, writer: asyncio.StreamWriter) -> None:
    writer.write(chunked(b"data: one\n\n", b"data: two\n\n"))
    await writer.drain()


def pool_for(server: Server, *, timeout_s: float = 5.0, **headers: str) -> StreamPool:
    return StreamPool(
        yarl.URL(f"http://127.0.0.1:{server.port}/v1/chat/completions"),
        headers=headers or {"Authorization": "Bearer k"},
        timeout_s=timeout_s,
        connect_timeout_s=timeout_s,
        max_connections=4,
    )


async def body_of(response: StreamedResponse) -> list[bytes]:
    pieces: list[bytes] = []
    try:
        await response.stream(pieces.append)
    finally:
        response.release()
    return pieces


@pytest.fixture
async def ok_server() -> AsyncIterator[Server]:
    async with Server(answer_ok) as server:
        yield server


async def test_the_body_is_pushed_as_it_comes_and_the_connection_kept(ok_server: Server) -> None:
    pool = pool_for(ok_server)
    for _ in range(3):
        response = await pool.post(b'{"a": 1}')
        assert response.status == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert b"".join(await body_of(response)) == b"data: one\n\ndata: two\n\n"
    assert ok_server.connections == 1
    head, _, body = ok_server.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{ok_server.port}".encode() in head
    assert b"Authorization: Bearer k" in head
    assert b"Content-Length: 8" in head
    assert body == b'{"a": 1}'
    await pool.close()


async def test_a_kept_connection_the_server_closed_is_replaced_at_once() -> None:
    async def first_only(count: int, writer: asyncio.StreamWriter) -> None:
        if count == 1:
            await answer_ok(count, writer)
        else:
            writer.close()  # closed on the next request, without an answer

    async with Server(first_only) as server:
        pool = pool_for(server)
        for _ in range(3):
            assert b"".join(await body_of(await pool.post(b"{}"))).startswith(b"data: one")
        assert server.connections == 3
        await pool.close()


async def test_a_body_that_ends_with_the_connection_and_one_of_known_length() -> None:
    async def until_close(count: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\ndata: all\n\n")
        await writer.drain()
        writer.close()

    async with Server(until_close) as server:
        pool = pool_for(server)
        assert b"".join(await body_of(await pool.post(b"{}"))) == b"data: all\n\n"
        assert b"".join(await body_of(await pool.post(b"{}"))) == b"data: all\n\n"
        assert server.connections == 2  # not kept: it was closed
        await pool.close()

    async def with_length(count: int, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b'HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nContent-Length: 9\r\n\r\n{"e": 42}'
        )
        await writer.drain()

    async with Server(with_length) as server:
        pool = pool_for(server)
        response = await pool.post(b"{}")
        assert (response.status, response.headers["retry-after"]) == (429, "3")
        assert await response.read(1000) == b'{"e": 42}'
        response.release()
        response = await pool.post(b"{}")
        assert await response.read(4) == b'{"e"'  # cut at the limit
        response.release()
        assert server.connections == 1
        await pool.close()


async def test_a_body_that_stalls_longer_than_the_timeout_fails_with_timeout() -> None:
    async def stall(count: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"data: a\n\n", b"data: b\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.3)  # each within the timeout: the timer is re-armed
        await asyncio.sleep(30)

    async with Server(stall) as server:
        pool = pool_for(server, timeout_s=0.5)
        response = await pool.post(b"{}")
        pieces: list[bytes] = []
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await response.stream(pieces.append)
        response.release()
        assert pieces == [b"data: a\n\n", b"data: b\n\n"]
        assert 0.5 <= time.monotonic() - started < 3
        await pool.close()


async def test_a_server_that_never_answers_times_out_and_one_that_is_down_is_refused() -> None:
    async def silent(count: int, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async with Server(silent) as server:
        pool = pool_for(server, timeout_s=0.3)
        with pytest.raises(TimeoutError):
            await pool.post(b"{}")
        await pool.close()
    closed = pool_for(server)  # the server is gone: nothing listens on its port
    with pytest.raises(ConnectionRefusedError):
        await closed.post(b"{}")


async def test_what_the_reader_raises_ends_the_stream_and_the_connection() -> None:
    async def in_two_parts(count: int, writer: asyncio.StreamWriter) -> None:
        first, rest = chunked(b"data: one\n\n", b"data: two\n\n").split(b"data: two")
        writer.write(first)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"data: two" + rest)
        await writer.drain()

    async with Server(in_two_parts) as server:
        pool = pool_for(server)
        response = await pool.post(b"{}")

        def refuse(data: bytes) -> None:
            raise ValueError("not for me")

        with pytest.raises(ValueError, match="not for me"):
            await response.stream(refuse)
        response.release()
        assert b"".join(await body_of(await pool.post(b"{}"))).startswith(b"data: one")
        assert server.connections == 2  # the one read half-way was not kept
        await pool.close()


async def test_an_answer_that_is_not_http_is_a_connection_error() -> None:
    async def garbage(count: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    async with Server(garbage) as server:
        pool = pool_for(server)
        with pytest.raises(ConnectionResetError, match="not HTTP"):
            await pool.post(b"{}")
        await pool.close()


def test_a_header_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        StreamPool(
            yarl.URL("http://127.0.0.1:1/v1/chat/completions"),
            headers={"Authorization": "Bearer k\r\nX-Injected: 1"},
            timeout_s=1,
            connect_timeout_s=1,
            max_connections=1,
        )
