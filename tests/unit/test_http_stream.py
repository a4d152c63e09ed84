"""The model request's HTTP client against a real server on loopback, scripted byte by byte:
how the body is pushed, when a connection is kept, and how each failure is reported."""

from __future__ import annotations

import asyncio
import datetime
import gc
import ipaddress
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import yarl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from parley import http_stream
from parley.http_stream import StreamedResponse, StreamPool
from parley.llm_http import ChatCompletionsEndpoint, read_body

# What the scripted server does with one request on a connection: it gets the connection's
# request count (1 for the first) and the writer.
Answer = Callable[[int, asyncio.StreamWriter], Awaitable[None]]


class Server:
    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
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


def pool_for(
    server: Server, *, timeout_s: float = 5.0, tls: ssl.SSLContext | None = None
) -> StreamPool:
    scheme = "https" if tls is not None else "http"
    return StreamPool(
        yarl.URL(f"{scheme}://127.0.0.1:{server.port}/v1/chat/completions"),
        headers={"Authorization": "Bearer k"},
        timeout_s=timeout_s,
        connect_timeout_s=timeout_s,
        max_connections=4,
        tls=tls,
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


async def test_interim_responses_are_skipped_and_nothing_after_the_response_is_read() -> None:
    async def early_hints_then_extra(count: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)  # the final response in a read of its own
        extra = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nSECOND\n"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nfirst\n" + extra)
        await writer.drain()

    async with Server(early_hints_then_extra) as server:
        pool = pool_for(server)
        response = await pool.post(b"{}")
        assert response.status == 200
        assert "link" not in response.headers
        assert await body_of(response) == [b"first\n"]
        assert b"".join(await body_of(await pool.post(b"{}"))) == b"first\n"
        assert server.connections == 2  # the one that said too much was not kept
        await pool.close()


async def test_a_run_cancelled_mid_stream_gives_back_its_slot_and_its_connection() -> None:
    async def slow(count: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(30)

    async with Server(slow) as server:
        pool = StreamPool(
            yarl.URL(f"http://127.0.0.1:{server.port}/v1/chat/completions"),
            headers={},
            timeout_s=5,
            connect_timeout_s=5,
            max_connections=1,
        )
        for _ in range(2):  # one slot: the second run gets it only if the first gave it back
            response = await pool.post(b"{}")
            pieces: list[bytes] = []
            reading = asyncio.create_task(response.stream(pieces.append))
            await asyncio.sleep(0.1)
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            response.release()
            assert pieces == [b"hello"]
        assert server.connections == 2  # a response read half-way is never kept
        await pool.close()


async def test_a_kept_connection_idle_for_longer_than_keepalive_is_not_used(
    ok_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_stream, "KEEPALIVE_S", 0.2)
    pool = pool_for(ok_server)
    await body_of(await pool.post(b"{}"))
    await body_of(await pool.post(b"{}"))
    assert ok_server.connections == 1
    await asyncio.sleep(0.3)
    await body_of(await pool.post(b"{}"))
    assert ok_server.connections == 2
    await pool.close()


def self_signed(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = http_stream.tls_context()
    client.load_verify_locations(cert_file)
    return server, client


async def test_https_is_verified_and_streams_alike(tmp_path: Path) -> None:
    server_tls, client_tls = self_signed(tmp_path)
    async with Server(answer_ok, tls=server_tls) as server:
        pool = pool_for(server, tls=client_tls)
        for _ in range(2):
            assert b"".join(await body_of(await pool.post(b"{}"))).startswith(b"data: one")
        assert server.connections == 1
        await pool.close()
        untrusting = pool_for(server, tls=http_stream.tls_context())
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusting.post(b"{}")


async def test_a_redirected_endpoint_is_followed_as_the_sdk_follows_it() -> None:
    server: Server

    async def moved(count: int, writer: asyncio.StreamWriter) -> None:
        if server.requests[-1].startswith(b"POST /v1/chat/completions "):
            writer.write(b"HTTP/1.1 307 Moved\r\nLocation: /v2/chat\r\nContent-Length: 0\r\n\r\n")
        else:
            writer.write(chunked(b"data: moved\n\n"))
        await writer.drain()

    async with Server(moved) as server:
        endpoint = ChatCompletionsEndpoint(
            base_url=f"http://127.0.0.1:{server.port}/v1",
            api_key="k",
            timeout_s=5,
            max_retries=0,
            max_connections=2,
        )
        try:
            for _ in range(2):
                response = await endpoint.open_stream({"model": "m"})
                pieces: list[bytes] = []
                try:
                    await read_body(response, pieces.append)
                finally:
                    response.release()
                assert b"".join(pieces) == b"data: moved\n\n"
            paths = [request.split(b" ")[1] for request in server.requests]
            # The first request learns of the redirect; from then on aiohttp asks and follows.
            v1, v2 = b"/v1/chat/completions", b"/v2/chat"
            assert paths == [v1, v1, v2, v1, v2]
        finally:
            await endpoint.close()


async def test_a_released_response_frees_its_reader_without_a_garbage_collection(
    ok_server: Server,
) -> None:
    """The parser holds its exchange's callbacks (a reference cycle): released, the exchange
    lets go of it and of the reader the body went to, so a run's streaming state is freed at
    once, not by the cycle collector (whose passes, under load, paused every stream)."""

    class Reader:
        def __init__(self) -> None:
            self.pieces: list[bytes] = []

        def feed(self, data: bytes) -> None:
            self.pieces.append(data)

    pool = pool_for(ok_server)
    gc.disable()
    try:
        for release_early in (False, True):
            reader = Reader()
            response = await pool.post(b"{}")
            if not release_early:
                await response.stream(reader.feed)
                assert reader.pieces
            response.release()
            freed = weakref.ref(reader)
            del reader, response
            assert freed() is None
    finally:
        gc.enable()
    await pool.close()
