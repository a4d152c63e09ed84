"""The built-in tools: `calculator`, `current_time`, `search_history`.

Each is a typed async function taking pydantic-ai's `RunContext[RunDeps]`; its docstring is the
description the model reads, and its type hints are the argument schema.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic_ai.tools import RunContext

from parley.store import queries
from parley.tools import RunDeps, ToolError, ToolFunction
from parley.tools.calculator import CalculatorError, evaluate

MAX_QUERY_CHARS = 200
SNIPPET_CHARS = 300


async def calculator(ctx: RunContext[RunDeps], expression: str) -> dict[str, Any]:
    """Evaluate an arithmetic expression exactly, e.g. "(2 + 3) * 4 ** 2" or "sqrt(2)".

    Supports + - * / // % ** parentheses, abs round min max sqrt log log10 exp sin cos tan
    floor ceil, and the constants pi, e, tau.
    """
    try:
        value = evaluate(expression)
    except CalculatorError as exc:
        raise ToolError(str(exc)) from None
    return {"expression": expression, "result": value}


async def current_time(ctx: RunContext[RunDeps], timezone: str = "UTC") -> dict[str, Any]:
    """The current date and time in an IANA time zone such as "Europe/Paris" or "UTC"."""
    if not timezone or len(timezone) > 64 or ".." in timezone or timezone.startswith("/"):
        raise ToolError(f"unknown time zone {timezone!r}")
    try:
        # ZoneInfo reads the zone file from disk the first time: keep that off the event loop.
        zone = await asyncio.to_thread(ZoneInfo, timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown time zone {timezone!r}") from None
    now = datetime.now(zone)
    return {
        "timezone": timezone,
        "iso": now.isoformat(timespec="seconds"),
        "weekday": now.strftime("%A"),
    }


async def search_history(ctx: RunContext[RunDeps], query: str) -> dict[str, Any]:
    """Search the user's own earlier messages (all threads) for a word or phrase."""
    query = query.strip()
    if not query or len(query) > MAX_QUERY_CHARS:
        raise ToolError(f"query must be 1 to {MAX_QUERY_CHARS} characters")
    async with ctx.deps.db.read() as session:
        found = await queries.search_messages(session, user_id=ctx.deps.user_id, query=query)
    return {
        "query": query,
        "matches": [
            {
                "thread_id": m.thread_id,
                "at": m.created_at.isoformat(timespec="seconds"),
                "text": m.content[:SNIPPET_CHARS],
            }
            for m in found
        ],
    }


BUILTIN_TOOLS: tuple[ToolFunction, ...] = (calculator, current_time, search_history)
