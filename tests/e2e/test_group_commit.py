"""Group commit end to end: with the event log's writer spacing every batch (as it does under
load, store/group_commit.py), concurrent streamed runs keep every invariant, and their events
really are gathered into fewer transactions."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx

from tests.conftest import SpawnServer
from tests.fakes.llm_server import FakeLLM, Text
from tests.harness import ServerProcess, make_token, metric, unique_user

CONVERSATIONS = 8


async def converse(server: ServerProcess, user: str, prompt: str) -> dict[str, Any]:
    """One streamed run: its live events, and the thread's stored events and messages."""
    async with server.connect(user) as client:
        accepted = await client.ask(prompt)
        live = await client.run_events(accepted["run_id"], timeout=30)
    headers = {"Authorization": f"Bearer {make_token(user)}"}
    thread = accepted["thread_id"]
    async with httpx.AsyncClient(base_url=server.http, headers=headers) as http:
        stored = (await http.get(f"/api/threads/{thread}/events")).json()["events"]
        messages = (await http.get(f"/api/threads/{thread}/messages")).json()["messages"]
    return {"live": live, "stored": stored, "messages": messages}


async def test_streams_under_a_writer_that_always_spaces_its_batches_keep_every_invariant(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    # Every batch at least 100 ms after the one before, whatever the load.
    server = spawn(DATABASE_COMMIT_BUSY_RATE="0", DATABASE_COMMIT_SPACING_MS="100")
    trigger = f"T{uuid.uuid4().hex[:12]}"
    answer = " ".join(f"w{i}" for i in range(120))
    fake_llm.script(trigger, Text(answer, chunk=3, delay_s=0.004))
    async with httpx.AsyncClient(base_url=server.http) as http:
        before = (await http.get("/metrics")).text
    results = await asyncio.gather(
        *(converse(server, unique_user(), f"talk {trigger}") for _ in range(CONVERSATIONS))
    )
    async with httpx.AsyncClient(base_url=server.http) as http:
        after = (await http.get("/metrics")).text

    for result in results:
        live, stored = result["live"], result["stored"]
        assert live[-1]["type"] == "agent_completed"
        deltas = "".join(e["text"] for e in live if e["type"] == "agent_message_delta")
        assert deltas == live[-1]["content"] == answer
        assert [m["content"] for m in result["messages"] if m["role"] == "assistant"] == [answer]
        assert stored == live  # what was sent live is what is stored, byte for byte
        assert [e["seq"] for e in stored] == list(range(1, len(stored) + 1))
    # The spacing gathered the conversations' events: far fewer transactions than events.
    events = sum(len(result["stored"]) for result in results)
    batches = metric(after, "parley_eventlog_batch_size_count") - metric(
        before, "parley_eventlog_batch_size_count"
    )
    assert batches * 5 <= events, (batches, events)
