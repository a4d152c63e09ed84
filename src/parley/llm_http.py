"""The HTTP side of a streamed model request: one POST to an OpenAI-compatible
`/chat/completions`, retried as the OpenAI SDK retries, its body handed back unread.

Why not the SDK's client for this request: under load its request building (header merging,
URL re-parsing, its JSON encoder) and the httpx2 client stack in front of its aiohttp transport
were 43 % of a whole run's CPU, several times the cost of the request itself
(bench/README.md). Here the URL and headers are built once and the request goes out through
`http_stream.StreamPool`, which pushes the body to the reader as it arrives (through a proxy,
through aiohttp). The SDK's behaviour is kept (`openai._base_client`), so a provider sees the same
client: a Bearer key; connection errors, timeouts and HTTP 408, 409, 429 and 5xx retried
(`x-should-retry` obeyed), after `retry-after-ms` / `Retry-After` when the provider names a
wait of up to two minutes, else after a jittered exponential backoff from 0.5 s up to 8 s.
The SDK's client still serves the cold paths (the probe).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import json
import math
import random
import time
from collections.abc import Mapping
from typing import Any, Protocol

import aiohttp
import yarl
from aiohttp.helpers import get_env_proxy_for_url
from pydantic_core import to_json

from parley import __version__
from parley.http_stream import BodySink, StreamPool, tls_context
from parley.observability import get_logger

log = get_logger(__name__)

# The SDK's constants (openai/_constants.py).
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
MAX_RETRY_AFTER_S = 120.0
RETRIED_STATUSES = frozenset({408, 409, 429})
# An error body is read for its message only; a provider's page of HTML is cut short.
MAX_ERROR_BODY = 64 * 1024


class ProviderHTTPError(Exception):
    """The provider answered the request with an HTTP error status."""

    def __init__(self, status: int, url: str, headers: Mapping[str, str], message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if message else f"HTTP {status}")
        self.status_code = status
        self.url = url
        self.headers = headers
        self.message = message


class ProviderConnectionError(Exception):
    """The provider could not be reached, or the connection failed or timed out; the cause is
    chained (`__cause__`), e.g. ConnectionRefusedError."""


class ModelResponse(Protocol):
    """A response whose status and headers are in and whose body is still to come."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def stream(self, sink: BodySink) -> None:
        """Push the body to `sink` as it arrives; returns at its end."""

    async def read(self, limit: int) -> bytes:
        """The body, up to `limit` bytes."""

    def release(self) -> None:
        """Done with it (read to its end or not); call once."""


class ChatCompletionsEndpoint:
    """POSTs streamed chat-completions requests to one OpenAI-compatible endpoint."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        timeout_s: float,
        max_retries: int,
        max_connections: int,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._target = yarl.URL(self.url)  # parsed once, not on every request
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            # The answer is read as it streams: a compressed one could not be read line by
            # line (and compression buffers what should flow).
            "Accept-Encoding": "identity",
            # Local endpoints take no key; the SDK sends a placeholder, and so do we.
            "Authorization": f"Bearer {api_key or 'not-needed'}",
            "User-Agent": f"Parley/{__version__}",
            # E.g. the SDK's `OpenAI-Organization` / `OpenAI-Project`, when it has them.
            **(extra_headers or {}),
        }
        # As the SDK's: `timeout_s` bounds getting a connection, connecting (at most 5 s) and
        # each wait for data, not the whole answer, which may stream for longer.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout_s, sock_connect=min(5.0, timeout_s), sock_read=timeout_s
        )
        self._max_retries = max_retries
        self._max_connections = max_connections
        # The proxy the environment names for this endpoint (HTTP(S)_PROXY, NO_PROXY), which
        # the SDK's client honours too. Looked up once: aiohttp's `trust_env` looks it up in
        # the environment on every request, ~0.3 ms each (measured).
        self._proxy: yarl.URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None
        if not _is_loopback(self._target.host):  # a local model is never behind a proxy
            with contextlib.suppress(LookupError):
                self._proxy, self._proxy_auth = get_env_proxy_for_url(self._target)
        self._timeout_s = timeout_s
        self._tls = tls_context() if self._target.scheme == "https" else None
        self._pool: StreamPool | None = None
        self._redirected = False
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def open_stream(self, body: dict[str, Any]) -> ModelResponse:
        """Send the request (retrying as the SDK does); returns the response with its body
        unread. Raises `ProviderHTTPError` or `ProviderConnectionError`."""
        payload = to_json(body)  # pydantic-core's encoder: a quarter of `json.dumps`'s cost
        # A loop of our own, not stamina's (used at startup): its per-call setup cost about as
        # much as the request itself on this path (bench/README.md).
        retries = 0
        while True:
            try:
                return await self._post(payload)
            except (ProviderHTTPError, ProviderConnectionError) as exc:
                wait = retry_wait(exc, retries)
                if retries >= self._max_retries or wait is None:
                    raise
            retries += 1
            await asyncio.sleep(wait)

    async def _post(self, payload: bytes) -> ModelResponse:
        if self._proxy is not None or self._redirected:
            response = await self._post_with_aiohttp(payload)
        else:
            response = await self._post_directly(payload)
            if 300 <= response.status < 400:
                # The SDK follows redirects; aiohttp does too. A redirected base URL is a
                # setting to fix (each request would cost a second one), so it is said once.
                response.release()
                log.warning(
                    "llm.endpoint_redirects; set LLM_BASE_URL to where it leads",
                    status=response.status,
                    location=response.headers.get("location"),
                )
                self._redirected = True
                response = await self._post_with_aiohttp(payload)
        if response.status < 400:
            return response
        body = b""
        try:
            body = await response.read(MAX_ERROR_BODY)
        except (OSError, aiohttp.ClientError, TimeoutError):
            pass  # the status says enough
        finally:
            response.release()
        raise ProviderHTTPError(response.status, self.url, response.headers, _error_message(body))

    async def _post_directly(self, payload: bytes) -> ModelResponse:
        pool = self._pool_for_loop()
        try:
            return await pool.post(payload)
        except (OSError, TimeoutError) as exc:
            raise ProviderConnectionError(_describe(exc)) from exc

    async def _post_with_aiohttp(self, payload: bytes) -> ModelResponse:
        """Through a proxy, or to an endpoint that redirects (aiohttp follows redirects)."""
        session = self._session_for_loop()
        try:
            response = await session.post(
                self._target,
                data=payload,
                headers=self._headers,
                timeout=self._timeout,
                proxy=self._proxy,
                proxy_auth=self._proxy_auth,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderConnectionError(_describe(exc)) from exc
        return _AiohttpResponse(response)

    def _pool_for_loop(self) -> StreamPool:
        if self._closed:
            raise ProviderConnectionError("the server is shutting down")
        # Made on first use, inside the event loop that will use it (its connections are).
        if self._pool is None:
            self._pool = StreamPool(
                self._target,
                headers=self._headers,
                timeout_s=self._timeout_s,
                connect_timeout_s=min(5.0, self._timeout_s),
                max_connections=self._max_connections,
                tls=self._tls,
            )
        return self._pool

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ProviderConnectionError("the server is shutting down")
        # Made on first use, inside the event loop that will use it (aiohttp's rule).
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
                # A model API sets no cookies worth keeping; the jar's filtering per request is
                # work for nothing.
                cookie_jar=aiohttp.DummyCookieJar(),
                # Nothing to decompress: the request asks for the body as it is.
                auto_decompress=False,
                raise_for_status=False,
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            await self._pool.close()
        if self._session is not None:
            await self._session.close()


class _AiohttpResponse:
    """An aiohttp response (through a proxy, or redirected) as a `ModelResponse`."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def stream(self, sink: BodySink) -> None:
        content = self._response.content
        while chunk := await content.readany():
            sink(chunk)

    async def read(self, limit: int) -> bytes:
        body = b""
        while len(body) < limit and (piece := await self._response.content.read(4096)):
            body += piece
        return body[:limit]

    def release(self) -> None:
        self._response.release()


async def read_body(response: ModelResponse, sink: BodySink) -> None:
    """Push the streamed body to `sink`; a failure of the connection, or no data for the
    timeout, is a `ProviderConnectionError` (what `sink` raises passes through)."""
    try:
        await response.stream(sink)
    except (OSError, aiohttp.ClientError, TimeoutError) as exc:
        raise ProviderConnectionError(_describe(exc)) from exc


def retry_wait(exc: ProviderHTTPError | ProviderConnectionError, retries: int) -> float | None:
    """How long to wait before retrying after `exc` (the `retries`-th retry so far), or None
    when it is not worth retrying: the provider's own wait when it names one, else the
    jittered exponential backoff."""
    backoff = min(INITIAL_RETRY_DELAY_S * 2.0**retries, MAX_RETRY_DELAY_S)
    backoff *= 1 - 0.25 * random.random()
    if isinstance(exc, ProviderConnectionError):
        return backoff
    wait = retry_after(exc.headers)
    if wait is not None and wait > MAX_RETRY_AFTER_S:
        return None  # the provider asks for longer than any run should wait
    should = exc.headers.get("x-should-retry")
    if should == "false":
        return None
    if should != "true" and exc.status_code not in RETRIED_STATUSES and exc.status_code < 500:
        return None
    return wait if wait is not None and wait > 0 else backoff


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the provider asked to wait (`retry-after-ms`, `Retry-After` as seconds or an
    HTTP date), or None."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if math.isfinite(seconds):
            return seconds
        # As the SDK: a number too large for a float is a wait too long to honour; a literal
        # `inf` or `nan` names no wait at all (the backoff applies).
        literal = value.strip().lower().lstrip("+") in ("inf", "infinity", "nan")
        return None if literal else MAX_RETRY_AFTER_S + 1
    date = headers.get("retry-after")
    if date is None:
        return None
    try:
        parsed = email.utils.parsedate_tz(date)
        return None if parsed is None else float(email.utils.mktime_tz(parsed) - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _error_message(body: bytes) -> str:
    """The provider's error message, from an OpenAI-style body (`{"error": {"message"}}`)."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return str(message)[:200] if message else ""


def _is_loopback(host: str | None) -> bool:
    if host is None or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):  # asyncio's and aiohttp's timeouts are TimeoutErrors
        return "timed out"
    return str(exc) or type(exc).__name__
