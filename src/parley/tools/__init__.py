"""The tool dispatcher: a registry of typed Python functions offered to agents as tools.

Arguments are validated by pydantic-ai from each function's type hints. `DispatchingToolset`
wraps every call: it emits `tool_executing` before and `tool_completed` after, enforces a
per-call timeout and a result size cap, and turns any failure into a tool error that is
returned to the model as the tool's result. A failing tool never kills the run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic_ai.tools import RunContext
from pydantic_ai.toolsets import FunctionToolset, WrapperToolset
from pydantic_ai.toolsets.abstract import ToolsetTool

from parley.observability import Metrics, get_logger
from parley.protocol import RunEvent, ToolCompleted, ToolExecuting
from parley.store.db import Database

log = get_logger(__name__)


@dataclass(frozen=True)
class RunDeps:
    """What a run hands to its agent and tools: who is asking, where, and how to report."""

    user_id: str
    thread_id: str
    run_id: str
    db: Database
    # Store and deliver one event of the run (after any streamed text before it).
    emit: Callable[[RunEvent], Awaitable[RunEvent]]
    # The same without waiting for it to be stored (a progress note; order is kept).
    post: Callable[[RunEvent], None]
    # Stream answer text: coalesced into `agent_message_delta` events; never blocks.
    text: Callable[[str], None]


ToolFunction = Callable[..., Awaitable[Any]]


class ToolError(Exception):
    """Raised by a tool for a failure the model should read (bad argument, unknown zone)."""


class DispatchingToolset(WrapperToolset[RunDeps]):
    def __init__(
        self,
        wrapped: FunctionToolset[RunDeps],
        *,
        timeout_s: float,
        result_max_bytes: int,
        metrics: Metrics,
    ) -> None:
        super().__init__(wrapped)
        self._timeout_s = timeout_s
        self._result_max_bytes = result_max_bytes
        self._metrics = metrics
        self._listing: dict[str, ToolsetTool[RunDeps]] | None = None

    async def get_tools(self, ctx: RunContext[RunDeps]) -> dict[str, ToolsetTool[RunDeps]]:
        return await self.listing(lambda: ctx)

    async def listing(
        self, run_context: Callable[[], RunContext[RunDeps]]
    ) -> dict[str, ToolsetTool[RunDeps]]:
        """The tools, listed once: they are plain functions (ToolRegistry) with no `prepare`
        step, so their listing does not depend on the run. pydantic-ai lists them anew for
        every request, which was ~5 % of a short run's CPU (bench/README.md); `run_context`
        is only called for the first listing."""
        if self._listing is None:
            self._listing = await super().get_tools(run_context())
        return self._listing

    async def call_tool(
        self,
        name: str,
        tool_args: dict[str, Any],
        ctx: RunContext[RunDeps],
        tool: ToolsetTool[RunDeps],
    ) -> Any:
        call_id = ctx.tool_call_id or f"call_{name}"
        await ctx.deps.emit(ToolExecuting(tool_call_id=call_id, tool=name, arguments=tool_args))
        started = time.perf_counter()
        error: str | None = None
        result: Any = None
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await self.wrapped.call_tool(name, tool_args, ctx, tool)
            encoded = json.dumps(result, default=str)
            if len(encoded.encode()) > self._result_max_bytes:
                error = f"result larger than {self._result_max_bytes} bytes"
        except ToolError as exc:
            error = str(exc)
        except TimeoutError:
            error = f"tool timed out after {self._timeout_s:g}s"
        except Exception as exc:
            log.exception("tool.failed", tool=name, run_id=ctx.deps.run_id)
            error = f"tool failed: {type(exc).__name__}"
        duration_ms = int((time.perf_counter() - started) * 1000)
        status = "error" if error is not None else "ok"
        self._metrics.tool_seconds.labels(tool=name, status=status).observe(duration_ms / 1000)
        await ctx.deps.emit(
            ToolCompleted(
                tool_call_id=call_id,
                tool=name,
                status=status,
                result=result if error is None else None,
                error=error,
                duration_ms=duration_ms,
            )
        )
        # The model reads a failure as the tool's result, and can explain or try again.
        return result if error is None else {"error": error}


class ToolRegistry:
    """The named tools this server offers; agents pick theirs by name."""

    def __init__(
        self,
        functions: Sequence[ToolFunction],
        *,
        timeout_s: float,
        result_max_bytes: int,
        metrics: Metrics,
    ) -> None:
        self._functions = {fn.__name__: fn for fn in functions}
        if len(self._functions) != len(functions):
            raise ValueError("two tools share a name")
        self._timeout_s = timeout_s
        self._result_max_bytes = result_max_bytes
        self._metrics = metrics

    @property
    def names(self) -> list[str]:
        return sorted(self._functions)

    def toolset(self, names: Sequence[str]) -> DispatchingToolset:
        unknown = set(names) - set(self._functions)
        if unknown:
            raise ValueError(f"unknown tools: {', '.join(sorted(unknown))}")
        functions = FunctionToolset[RunDeps]([self._functions[n] for n in names])
        return DispatchingToolset(
            functions,
            timeout_s=self._timeout_s,
            result_max_bytes=self._result_max_bytes,
            metrics=self._metrics,
        )
