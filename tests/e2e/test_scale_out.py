"""Two Parley instances sharing PostgreSQL (store and event log) and Redis (delivery)."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from tests.conftest import SpawnServer
from tests.fakes.llm_server import FakeLLM, Text, ToolCall
from tests.harness import unique_user

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


async def test_a_run_on_one_instance_reaches_the_user_on_another_and_resumes_there(
    spawn: SpawnServer, fake_llm: FakeLLM, postgres_url: str, redis_url: str
) -> None:
    shared = {"DATABASE_URL": postgres_url, "REDIS_URL": redis_url}
    a = spawn(**shared)
    b = spawn(**shared)
    t = fake_llm.script(
        f"T{uuid.uuid4().hex[:10]}",
        ToolCall([("calculator", {"expression": "6 * 7"})]),
        Text("It is 42."),
    )
    user = unique_user()
    async with a.connect(user) as on_a, b.connect(user) as on_b:
        accepted = await on_a.ask(f"six times seven {t}")
        seen_on_a, seen_on_b = await asyncio.gather(
            on_a.run_events(accepted["run_id"]), on_b.run_events(accepted["run_id"])
        )
    assert seen_on_a == seen_on_b
    assert seen_on_b[-1]["type"] == "agent_completed"
    assert seen_on_b[-1]["content"] == "It is 42."

    # Reconnect to the *other* instance and resume: no sticky sessions needed.
    async with b.connect(user) as again:
        await again.send({"type": "resume", "thread_id": accepted["thread_id"], "after_seq": 0})
        replayed = []
        while (frame := await again.recv())["type"] != "resume_complete":
            replayed.append(frame)
        follow_up = await again.ask("and again", thread_id=accepted["thread_id"])
        more = await again.run_events(follow_up["run_id"])
    assert replayed == seen_on_a
    assert more[0]["seq"] == seen_on_a[-1]["seq"] + 1

    async with httpx.AsyncClient(base_url=b.http) as http:
        ready = (await http.get("/health/ready")).json()["components"]
    assert ready["database"]["backend"] == "postgresql"
    assert ready["event_bus"]["backend"] == "redis"


async def test_concurrent_runs_in_one_thread_on_two_instances_keep_seq_dense_and_unique(
    spawn: SpawnServer, postgres_url: str, redis_url: str
) -> None:
    shared = {"DATABASE_URL": postgres_url, "REDIS_URL": redis_url, "MAX_RUNS_PER_USER": "8"}
    a = spawn(**shared)
    b = spawn(**shared)
    user = unique_user()
    async with a.connect(user) as on_a, b.connect(user) as on_b:
        first = await on_a.ask("start the thread")
        await on_a.run_events(first["run_id"])
        thread = first["thread_id"]
        await asyncio.gather(
            *(
                client.send({"type": "user_message", "content": f"m{i}", "thread_id": thread})
                for i, client in enumerate([on_a, on_b] * 3)
            )
        )
        headers = {"Authorization": f"Bearer {a.token(user)}"}
        async with httpx.AsyncClient(base_url=a.http, headers=headers) as http:
            for _ in range(200):
                events = (await http.get(f"/api/threads/{thread}/events")).json()["events"]
                terminals = [e for e in events if e["type"] == "agent_completed"]
                if len(terminals) == 7:
                    break
                await asyncio.sleep(0.1)
    assert len(terminals) == 7
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len({e["event_id"] for e in events}) == len(events)


async def test_stop_agent_on_one_instance_cancels_a_run_on_the_other(
    spawn: SpawnServer, fake_llm: FakeLLM, postgres_url: str, redis_url: str
) -> None:
    shared = {"DATABASE_URL": postgres_url, "REDIS_URL": redis_url}
    a = spawn(**shared)
    b = spawn(**shared)
    t = fake_llm.script(f"T{uuid.uuid4().hex[:10]}", Text("tick " * 300, chunk=5, delay_s=0.05))
    user = unique_user()
    async with a.connect(user) as on_a, b.connect(user) as on_b:
        accepted = await on_a.ask(f"count {t}")
        await on_a.recv_type("agent_message_delta")
        await on_b.send({"type": "stop_agent", "run_id": accepted["run_id"]})
        events = await on_a.run_events(accepted["run_id"])
        await on_b.send({"type": "stop_agent", "run_id": accepted["run_id"]})
        finished = await on_b.recv_type("error")
    assert events[-1]["type"] == "agent_cancelled"
    assert events[-1]["reason"] == "user_requested"
    assert finished["code"] == "not_found"
