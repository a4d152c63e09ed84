"""The provider probe: the cheapest real request showing that the configured model can answer,
classified like run errors, and the background monitor that keeps its result for readiness.

Invariants: readiness never waits on the provider (it reads the monitor's last result); the
provider sees at most one background probe per interval, whatever the readiness traffic; a
probe failure never prints the API key or the provider's error body (which may echo it).

The request: `GET /models` proves the endpoint is reachable and the key accepted; when the
configured model is in the list, that is all. When it is not listed (proxies and compatible
servers list aliases or nothing) or the endpoint cannot list, one completion of one token
decides, and a 404 there means the model is unknown. The embedded local model always
generates a short answer, because its failure mode is a runtime that loads but cannot generate.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import openai
from openai import AsyncOpenAI

from parley.observability import Metrics, get_logger

log = get_logger(__name__)

PROBE_PROMPT = "Reply with the single word: ready"
# A 404 or 405 on GET /models: the endpoint does not list models.
_NO_LISTING = (404, 405, 501)


class ProbeFailed(Exception):
    """The provider did not pass the probe. `transient`: retrying may help (unreachable,
    5xx, 429); otherwise it is configuration (refused key, unknown model)."""

    def __init__(self, reason: str, *, kind: str, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.transient = transient


@dataclass(frozen=True)
class Prober:
    """How to probe one configured model."""

    client: AsyncOpenAI
    model_name: str
    endpoint: str  # for messages: the base URL (it never carries the key)
    timeout_s: float
    generate: bool = False  # the local model: always generate and require text

    async def probe(self, *, thorough: bool = True) -> str:
        """One probe; returns what it proved. `thorough=False` (the background probe) accepts a
        listing without the model: the startup probe already showed that the model exists."""
        client = self.client.with_options(max_retries=0, timeout=self.timeout_s)
        try:
            async with asyncio.timeout(self.timeout_s + 1):
                if self.generate:
                    return await self._generate(client, max_tokens=8)
                try:
                    page = await client.models.list()
                except openai.APIStatusError as exc:
                    if exc.status_code not in _NO_LISTING:
                        raise
                    return await self._generate(client, max_tokens=1)
                if self.model_name in {m.id for m in page.data} or not thorough:
                    return "listed"
                return await self._generate(client, max_tokens=1)
        except ProbeFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a classified ProbeFailed
            raise self._classify(exc) from None

    async def _generate(self, client: AsyncOpenAI, *, max_tokens: int) -> str:
        completion = await client.chat.completions.create(
            model=self.model_name,
            messages=[{"role": "user", "content": PROBE_PROMPT}],
            max_tokens=max_tokens,
            temperature=0.0,
        )
        text = (completion.choices[0].message.content or "") if completion.choices else ""
        if self.generate and not text.strip():
            raise ProbeFailed(
                f"the model {self.model_name} answered nothing", kind="empty", transient=False
            )
        return "answered"

    def _classify(self, exc: Exception) -> ProbeFailed:
        where = self.endpoint
        if isinstance(exc, openai.APIConnectionError | TimeoutError):
            causes = exception_chain(exc)
            timed_out = any(isinstance(cause, TimeoutError) for cause in causes)
            what = "did not answer in time" if timed_out else "is unreachable"
            return ProbeFailed(
                f"{where} {what} ({type(causes[-1]).__name__})", kind="unreachable", transient=True
            )
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            if status == 429 or status >= 500:
                return ProbeFailed(
                    f"HTTP {status} from {where}", kind=f"http_{status}", transient=True
                )
            if status in (401, 403):
                return ProbeFailed(
                    f"{where} refused the API key (HTTP {status})",
                    kind="key_refused",
                    transient=False,
                )
            if status == 404:
                return ProbeFailed(
                    f"the model {self.model_name!r} is not known at {where} (HTTP 404)",
                    kind="unknown_model",
                    transient=False,
                )
            return ProbeFailed(
                f"{where} rejected the probe request (HTTP {status})",
                kind=f"http_{status}",
                transient=False,
            )
        return ProbeFailed(
            f"unexpected answer from {where} ({type(exc).__name__})",
            kind="invalid",
            transient=False,
        )


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the chain of exceptions that caused it, the root last. The root tells a timeout
    (a `TimeoutError`) from a refused or dropped connection: the SDK's names do not, because
    its aiohttp transport reports every failed connection as a `ConnectTimeout`."""
    chain = [exc]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) and cause not in chain:
        chain.append(cause)
    return chain


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ProbeMonitor:
    """Probes in the background every interval (plus jitter, never less) and remembers the
    last result. Logs a state change once, not every probe."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[str]],
        *,
        interval_s: float,
        metrics: Metrics,
        jitter: float = 0.2,
    ) -> None:
        self._probe = probe
        self.interval_s = interval_s
        self._metrics = metrics
        self._jitter = jitter
        self.ok: bool | None = None  # None: not probed yet
        self.reason: str | None = None
        self.last_success: str | None = None
        self.last_probe: str | None = None
        self.probes = 0

    def record(self, ok: bool, reason: str | None = None) -> None:
        changed = self.ok is not ok
        self.ok, self.reason = ok, reason
        self.last_probe = _now()
        if ok:
            self.last_success = self.last_probe
        self._metrics.llm_probe_up.set(1 if ok else 0)
        if changed and ok:
            log.info("llm.probe_recovered" if self.probes else "llm.probe_ok")
        elif changed:
            log.error("llm.probe_failed", reason=reason, last_success=self.last_success)

    async def probe_once(self) -> None:
        self.probes += 1
        started = time.perf_counter()
        try:
            await self._probe()
        except ProbeFailed as exc:
            self._metrics.llm_probe_failures.labels(kind=exc.kind).inc()
            self.record(False, exc.reason)
        except Exception as exc:  # a bug in the probe must not end the monitor silently
            log.exception("llm.probe_error", error=type(exc).__name__)
            self._metrics.llm_probe_failures.labels(kind="error").inc()
            self.record(False, f"probe error ({type(exc).__name__})")
        else:
            self.record(True)
        finally:
            self._metrics.llm_probe_seconds.observe(time.perf_counter() - started)

    async def run(self) -> None:
        """Forever: wait one interval (plus up to `jitter` of it), probe. Cancel to stop."""
        while True:
            await asyncio.sleep(self.interval_s * (1 + random.uniform(0, self._jitter)))
            await self.probe_once()

    def detail(self) -> dict[str, Any]:
        if self.ok is None:
            return {"probe": "pending"}
        detail: dict[str, Any] = {
            "probe": "ok" if self.ok else "failed",
            "last_probe": self.last_probe,
            "last_success": self.last_success,
        }
        if not self.ok:
            detail["reason"] = self.reason
        return detail
