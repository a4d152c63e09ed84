"""The LLM manager: builds the configured provider's model, guards it with a circuit breaker,
classifies provider failures, and answers readiness.

Every provider goes through pydantic-ai's model classes; `GuardedModel` wraps the model (the
shape of pydantic-ai's own `FallbackModel`) so the circuit breaker sees every request, streamed
or not, without living inside the client. When the circuit is open a request fails at once with
`LLMUnavailable`, so runs end within milliseconds instead of waiting on a dead provider.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import httpx2
import openai
from openai import AsyncOpenAI, DefaultAioHttpClient
from pydantic_ai.direct import model_request
from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelConnectionError,
    ModelHTTPError,
    ModelRateLimitError,
    ModelRequestRejectedError,
    ModelRequestTimeout,
    ModelServerError,
    ModelUnavailableError,
    UnexpectedModelBehavior,
)
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse
from pydantic_ai.models import Model, ModelRequestParameters, StreamedResponse
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext

from parley.circuit import CircuitBreaker, CircuitOpenError, CircuitState
from parley.errors import LLMError, LLMUnavailable, ParleyError
from parley.llm_http import ChatCompletionsEndpoint, ProviderConnectionError, ProviderHTTPError
from parley.llm_probe import ProbeMonitor, Prober, exception_chain
from parley.llm_stream import StreamFailed
from parley.observability import Metrics

_OUTAGES = (
    ModelConnectionError,
    ModelServerError,
    ModelUnavailableError,
    ModelRateLimitError,
    ModelRequestTimeout,
    httpx.TransportError,
    httpx2.TransportError,
    TimeoutError,
    # What the probe sees from the OpenAI SDK.
    openai.APIConnectionError,  # also APITimeoutError
    # What Parley's own streaming loop sees (llm_http.py, llm_stream.py).
    ProviderConnectionError,
    StreamFailed,
)


def is_outage(exc: BaseException) -> bool:
    """Failures that say the provider is down or overloaded (they open the circuit)."""
    if isinstance(exc, _OUTAGES):
        return True
    if isinstance(exc, ModelHTTPError | openai.APIStatusError | ProviderHTTPError):
        return exc.status_code >= 500 or exc.status_code == 429
    return False


def classify_llm_error(exc: BaseException) -> ParleyError | None:
    """The protocol error for a provider failure, or None when `exc` is not one."""
    if isinstance(exc, ParleyError):
        return exc
    if isinstance(exc, CircuitOpenError):
        return LLMUnavailable(f"language model unavailable: {exc}")
    if is_outage(exc):
        return LLMUnavailable(f"language model unavailable: {_brief(exc)}")
    refused = ModelRequestRejectedError | ModelAPIError | openai.APIStatusError | ProviderHTTPError
    if isinstance(exc, refused):
        return LLMError(f"language model refused the request: {_brief(exc)}")
    if isinstance(exc, UnexpectedModelBehavior):
        # The model answered, but with nothing usable (empty, or output that failed validation
        # after the allowed retries): the model's fault, and asking again may well work.
        return LLMError(_unusable_answer(exc), retryable=True)
    return None


def _unusable_answer(exc: UnexpectedModelBehavior) -> str:
    # pydantic-ai's cause is what it told the model when it asked again, e.g. "Please return
    # text." after an empty answer: that is what the model did wrong.
    said = f"; asked again: {str(exc.__cause__)[:160]}" if exc.__cause__ is not None else ""
    return f"the language model gave no usable answer ({exc.message}{said})"


def _public_url(url: str) -> str:
    """The URL without credentials or query (where some providers put keys)."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", url.split("?", 1)[0]).rstrip("/")


def _brief(exc: BaseException) -> str:
    if isinstance(exc, ModelHTTPError):
        return f"HTTP {exc.status_code} from {exc.model_name}"
    if isinstance(exc, openai.APIStatusError):
        # Never the body: some providers echo the request (and its key) in their errors.
        return f"HTTP {exc.status_code} from {_public_url(str(exc.request.url))}"
    if isinstance(exc, ProviderHTTPError):
        return f"HTTP {exc.status_code} from {_public_url(exc.url)}"
    if isinstance(exc, openai.APIConnectionError | ProviderConnectionError):
        # The root cause, as the probe names it (e.g. ConnectionRefusedError): the SDK calls
        # every failed connection a timeout (APITimeoutError) on its aiohttp transport.
        root = exception_chain(exc)[-1]
        return type(root).__name__ + (f": {root}" if root is not exc and str(root) else "")
    if isinstance(exc, StreamFailed):
        return f"the provider failed in the middle of its answer ({exc})"
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


class GuardedModel(WrapperModel):
    """Wraps a model with a circuit breaker and latency/failure metrics."""

    def __init__(
        self,
        wrapped: Model,
        breaker: CircuitBreaker,
        metrics: Metrics,
        down_reason: Callable[[], str | None] | None = None,
    ) -> None:
        super().__init__(wrapped)
        self.breaker = breaker
        self._metrics = metrics
        # Why the model cannot answer right now (its process is restarting), or None.
        self._down_reason = down_reason

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        async with self.guard():
            return await self.wrapped.request(messages, model_settings, model_request_parameters)

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        async with (
            self.guard(),
            self.wrapped.request_stream(
                messages, model_settings, model_request_parameters, run_context
            ) as stream,
        ):
            yield stream

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Around one model request (retries included): refused at once while the model is
        down or the circuit is open; an outage counts toward opening it, success closes it."""
        reason = self._down_reason() if self._down_reason is not None else None
        if reason is not None:
            self._metrics.llm_failures.labels(kind="process_down").inc()
            raise LLMUnavailable(f"language model unavailable: {reason}")
        try:
            self.breaker.before_call()
        except CircuitOpenError as exc:
            self._metrics.llm_failures.labels(kind="circuit_open").inc()
            raise LLMUnavailable(f"language model unavailable: {exc}") from None
        started = time.perf_counter()
        try:
            yield
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        except BaseException as exc:
            if is_outage(exc):
                self.breaker.record_failure()
                self._metrics.llm_failures.labels(kind=type(exc).__name__).inc()
            else:
                self.breaker.release()
            raise
        else:
            self.breaker.record_success()
        finally:
            self._metrics.llm_seconds.observe(time.perf_counter() - started)


class ModelProcess(Protocol):
    """A model server process Parley runs itself (the local model)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def down_reason(self) -> str | None: ...


@dataclass
class LLMManager:
    """The configured language model, ready for agents, with its readiness and a probe.

    Readiness is `down` when the circuit is open, the last background probe failed, or the
    model's own process is not serving; it never waits on the provider.
    """

    provider: str
    model_name: str
    model: GuardedModel
    # The endpoint Parley's agent loop streams through (llm_stream.py).
    endpoint: ChatCompletionsEndpoint
    # The provider's SDK client: the probe's (cold path) requests.
    client: AsyncOpenAI
    http_client: httpx2.AsyncClient
    description: str
    prober: Prober
    model_settings: ModelSettings | None = None
    process: ModelProcess | None = None
    monitor: ProbeMonitor | None = None

    def guard(self) -> AbstractAsyncContextManager[None]:
        """The circuit breaker and availability check around one model request."""
        return self.model.guard()

    @property
    def display_name(self) -> str:
        return f"{self.provider}:{self.model_name}"

    def readiness(self) -> dict[str, Any]:
        state = self.model.breaker.state
        status = {
            CircuitState.CLOSED: "ok",
            CircuitState.HALF_OPEN: "degraded",
            CircuitState.OPEN: "down",
        }[state]
        detail: dict[str, Any] = {
            "status": status,
            "provider": self.provider,
            "model": self.model_name,
            "description": self.description,
            "circuit": str(state),
        }
        if state is CircuitState.OPEN:
            detail["reason"] = "the circuit is open after repeated provider failures"
        if self.monitor is not None:
            detail.update(self.monitor.detail())
            if self.monitor.ok is False:
                detail.update(status="down", reason=self.monitor.reason)
        else:
            detail["probe"] = "off" if self.process is None else "process supervised"
        if self.process is not None:
            detail["pid"] = self.process.pid
            if (reason := self.process.down_reason) is not None:
                detail.update(status="down", reason=reason)
        return detail

    async def probe(self) -> str:
        """One small real request; returns the model's text. Raises on any failure."""
        response = await model_request(
            self.model,
            [ModelRequest.user_text_prompt("Reply with the single word: ready")],
            model_settings={"max_tokens": 8, "temperature": 0.0},
        )
        return response.text or ""

    async def close(self) -> None:
        await self.endpoint.close()
        await self.http_client.aclose()


def openai_compatible_manager(
    *,
    provider: str,
    model_name: str,
    base_url: str | None,
    api_key: str | None,
    timeout_s: float,
    max_retries: int,
    breaker: CircuitBreaker,
    metrics: Metrics,
    description: str,
    max_tokens: int | None = None,
    process: ModelProcess | None = None,
    probe_timeout_s: float | None = None,
    max_connections: int = 256,
) -> LLMManager:
    """A manager for any OpenAI-compatible endpoint (OpenAI itself, vLLM, llama.cpp's server).

    `probe_timeout_s` bounds one probe (default: the request timeout, at most 10 s).
    `max_connections` bounds the connections to the provider: a run makes one request at a
    time, so with the maximum of concurrent runs no run ever waits for a connection."""
    # The OpenAI SDK (for the probe) is built on httpx2 (the successor of httpx). Its own
    # aiohttp transport (the SDK's documented choice "for improved concurrency performance")
    # carries its requests: httpx2's default connection pool scans every pooled connection on
    # each request (bench/README.md).
    http_client = DefaultAioHttpClient(
        timeout=httpx2.Timeout(timeout_s, connect=min(5.0, timeout_s)),
        limits=httpx2.Limits(max_connections=8, max_keepalive_connections=2),
    )
    client = AsyncOpenAI(
        base_url=base_url,
        # Local endpoints take no key, but the SDK insists on one.
        api_key=api_key or "not-needed",
        max_retries=max_retries,
        http_client=http_client,
    )
    model = OpenAIChatModel(model_name, provider=OpenAIProvider(openai_client=client))
    return LLMManager(
        provider=provider,
        model_name=model_name,
        model=GuardedModel(
            model, breaker, metrics, (lambda: process.down_reason) if process else None
        ),
        # The SDK's base URL: its default (OpenAI's API) when none is configured.
        endpoint=ChatCompletionsEndpoint(
            base_url=str(client.base_url),
            api_key=api_key,
            timeout_s=timeout_s,
            max_retries=max_retries,
            max_connections=max_connections,
            # What the SDK sends from its settings (OPENAI_ORG_ID, OPENAI_PROJECT_ID).
            extra_headers={
                name: value
                for name, value in (
                    ("OpenAI-Organization", client.organization),
                    ("OpenAI-Project", client.project),
                )
                if value
            },
        ),
        client=client,
        http_client=http_client,
        description=description,
        prober=Prober(
            client=client,
            model_name=model_name,
            endpoint=_public_url(str(client.base_url)),
            timeout_s=probe_timeout_s or min(timeout_s, 10.0),
            generate=process is not None,
        ),
        model_settings={"max_tokens": max_tokens} if max_tokens else None,
        process=process,
    )
