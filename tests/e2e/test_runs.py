"""Runs end to end: a real server, the scripted LLM over HTTP, a real WebSocket client."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import SpawnServer
from tests.fakes.llm_server import FakeLLM, Hang, HttpError, Text, ToolCall
from tests.harness import TERMINAL, ServerProcess, free_port, make_token, unique_user


def trigger() -> str:
    return f"T{uuid.uuid4().hex[:12]}"


async def poll_readiness(server: ServerProcess, status: int, timeout: float = 5.0) -> Any:
    """Readiness is cached for up to a second: poll until it says `status`."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=server.http) as http:
        while True:
            response = await http.get("/health/ready")
            if response.status_code == status or time.monotonic() > deadline:
                assert response.status_code == status, response.text
                return response.json()
            await asyncio.sleep(0.1)


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


async def test_message_produces_the_full_event_sequence_with_a_tool_call(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    t = fake_llm.script(
        trigger(),
        ToolCall([("calculator", {"expression": "(2 + 3) * 4 ** 2"})]),
        Text("The result is 80, computed exactly.", chunk=5),
    )
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"what is (2+3)*4^2? {t}", client_message_id="c1")
        assert accepted["type"] == "message_accepted"
        assert accepted["client_message_id"] == "c1"
        events = await client.run_events(accepted["run_id"])

    assert types(events)[0] == "agent_started"
    assert events[0]["message_id"] == accepted["message_id"]
    assert "agent_thinking" in types(events)
    executing = next(e for e in events if e["type"] == "tool_executing")
    completed = next(e for e in events if e["type"] == "tool_completed")
    assert executing["tool"] == completed["tool"] == "calculator"
    assert executing["arguments"] == {"expression": "(2 + 3) * 4 ** 2"}
    assert completed["tool_call_id"] == executing["tool_call_id"]
    assert completed["status"] == "ok"
    assert completed["result"]["result"] == (2 + 3) * 4**2
    assert isinstance(completed["duration_ms"], int)
    assert types(events).index("tool_executing") < types(events).index("tool_completed")

    final = events[-1]
    assert final["type"] == "agent_completed"
    deltas = "".join(e["text"] for e in events if e["type"] == "agent_message_delta")
    assert deltas == final["content"] == "The result is 80, computed exactly."
    assert final["usage"]["input_tokens"] > 0
    assert final["usage"]["output_tokens"] > 0
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["event_id"] for e in events}) == len(events)
    for event in events:
        assert event["thread_id"] == accepted["thread_id"]
        assert event["ts"].endswith("Z")
    # The tool result went back to the model over HTTP.
    second_request = fake_llm.requests_with(t)[1]
    assert any(m.get("role") == "tool" and "80" in m["content"] for m in second_request["messages"])


async def test_follow_up_in_the_same_thread_sends_the_history_and_continues_seq(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    async with server.connect(unique_user()) as client:
        first = await client.ask("my name is Ada")
        first_events = await client.run_events(first["run_id"])
        t = trigger()
        second = await client.ask(f"what is my name? {t}", thread_id=first["thread_id"])
        second_events = await client.run_events(second["run_id"])

    assert second["thread_id"] == first["thread_id"]
    assert second_events[0]["seq"] == first_events[-1]["seq"] + 1
    sent = fake_llm.requests_with(t)[0]["messages"]
    roles = [(m["role"], m.get("content")) for m in sent if m["role"] != "system"]
    assert roles == [
        ("user", "my name is Ada"),
        ("assistant", "echo: my name is Ada"),
        ("user", f"what is my name? {t}"),
    ]


async def test_same_client_message_id_gets_the_same_acceptance_and_no_second_run(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    user = unique_user()
    t = trigger()
    async with server.connect(user) as client:
        first = await client.ask(f"once {t}", client_message_id="same-id")
        await client.run_events(first["run_id"])
        again = await client.ask(f"once {t}", client_message_id="same-id")
    assert again == {**first, "ts": again["ts"]}
    assert len(fake_llm.requests_with(t)) == 1
    async with httpx.AsyncClient(base_url=server.http) as http:
        response = await http.get(
            f"/api/threads/{first['thread_id']}/messages",
            headers={"Authorization": f"Bearer {make_token(user)}"},
        )
    assert [m["role"] for m in response.json()["messages"]] == ["user", "assistant"]


async def test_concurrent_duplicates_on_two_connections_start_one_run(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    user = unique_user()
    t = fake_llm.script(trigger(), Text("slow", delay_s=0.2))
    async with server.connect(user) as a, server.connect(user) as b:
        results = await asyncio.gather(
            a.ask(f"dup {t}", client_message_id="race"), b.ask(f"dup {t}", client_message_id="race")
        )
        assert results[0]["run_id"] == results[1]["run_id"]
        await a.run_events(results[0]["run_id"])
    assert len(fake_llm.requests_with(t)) == 1


async def test_stop_agent_cancels_a_running_run(server: ServerProcess, fake_llm: FakeLLM) -> None:
    t = fake_llm.script(trigger(), Text("word " * 200, chunk=5, delay_s=0.05))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"talk a lot {t}")
        await client.recv_type("agent_message_delta")
        await client.send({"type": "stop_agent", "run_id": accepted["run_id"]})
        events = await client.run_events(accepted["run_id"])
    assert events[-1]["type"] == "agent_cancelled"
    assert events[-1]["reason"] == "user_requested"
    assert sum(1 for e in events if e["type"] in TERMINAL) == 1


async def test_stop_of_unknown_finished_or_foreign_run_is_not_found(
    server: ServerProcess,
) -> None:
    async with server.connect(unique_user()) as owner:
        accepted = await owner.ask("hello")
        await owner.run_events(accepted["run_id"])
        await owner.send({"type": "stop_agent", "run_id": accepted["run_id"]})
        finished = await owner.recv_type("error")
        await owner.send({"type": "stop_agent", "run_id": str(uuid.uuid4())})
        unknown = await owner.recv_type("error")
    assert finished["code"] == unknown["code"] == "not_found"


async def test_another_users_running_run_cannot_be_stopped(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    t = fake_llm.script(trigger(), Text("x" * 40, chunk=2, delay_s=0.05))
    async with server.connect(unique_user()) as owner, server.connect(unique_user()) as other:
        accepted = await owner.ask(f"slow {t}")
        await other.send({"type": "stop_agent", "run_id": accepted["run_id"]})
        error = await other.recv_type("error")
        events = await owner.run_events(accepted["run_id"])
    assert error["code"] == "not_found"
    assert events[-1]["type"] == "agent_completed"


async def test_provider_http_500_ends_the_run_with_llm_unavailable(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    t = fake_llm.script(trigger(), HttpError(500))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"fail {t}")
        started = time.monotonic()
        events = await client.run_events(accepted["run_id"])
    assert events[-1]["type"] == "agent_error"
    assert events[-1]["code"] == "llm_unavailable"
    assert events[-1]["retryable"] is True
    assert time.monotonic() - started < 10
    assert types(events)[:2] == ["agent_started", "agent_thinking"]


async def test_provider_rejecting_the_request_is_a_non_retryable_llm_error(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    t = fake_llm.script(trigger(), HttpError(401, "bad key"))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"reject {t}")
        events = await client.run_events(accepted["run_id"])
    assert events[-1]["type"] == "agent_error"
    assert events[-1]["code"] == "llm_error"
    assert events[-1]["retryable"] is False


async def test_unreachable_provider_ends_runs_with_llm_unavailable_then_circuit_opens(
    spawn: SpawnServer,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    server = spawn(LLM_BASE_URL=dead, LLM_CIRCUIT_FAILURE_THRESHOLD="2", LLM_CIRCUIT_RESET_S="60")
    async with server.connect(unique_user()) as client:
        for _ in range(2):
            accepted = await client.ask("anyone there?")
            events = await client.run_events(accepted["run_id"])
            assert events[-1]["code"] == "llm_unavailable"
        accepted = await client.ask("and now?")
        started = time.monotonic()
        events = await client.run_events(accepted["run_id"])
        elapsed = time.monotonic() - started
    assert events[-1]["code"] == "llm_unavailable"
    assert "circuit" in events[-1]["message"]
    assert elapsed < 2
    ready = await poll_readiness(server, 503)
    assert ready["components"]["llm"]["status"] == "down"
    async with httpx.AsyncClient(base_url=server.http) as http:
        metrics = (await http.get("/metrics")).text
    assert 'parley_llm_circuit_open{provider="openai"} 1.0' in metrics


async def test_run_that_exceeds_its_deadline_ends_with_timeout(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(RUN_TIMEOUT_S="2", LLM_TIMEOUT_S="30")
    t = fake_llm.script(trigger(), Hang(20))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"hang {t}")
        started = time.monotonic()
        events = await client.run_events(accepted["run_id"], timeout=10)
        elapsed = time.monotonic() - started
    assert events[-1]["type"] == "agent_error"
    assert events[-1]["code"] == "timeout"
    assert events[-1]["retryable"] is True
    assert elapsed <= 2.5


async def test_tool_errors_are_reported_and_the_run_still_completes(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    t = fake_llm.script(
        trigger(),
        ToolCall(
            [
                ("calculator", {"expression": "__import__('os').system('true')"}),
                ("current_time", {"timezone": "Mars/Olympus_Mons"}),
            ]
        ),
        Text("Both tools failed."),
    )
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"break tools {t}")
        events = await client.run_events(accepted["run_id"])
    completed = [e for e in events if e["type"] == "tool_completed"]
    assert {e["tool"] for e in completed} == {"calculator", "current_time"}
    assert all(e["status"] == "error" and e["error"] for e in completed)
    assert events[-1]["type"] == "agent_completed"
    tool_messages = [m for m in fake_llm.requests_with(t)[1]["messages"] if m["role"] == "tool"]
    assert len(tool_messages) == 2
    assert all("error" in m["content"] for m in tool_messages)


async def test_current_time_tool_answers_for_an_iana_zone(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    t = fake_llm.script(
        trigger(), ToolCall([("current_time", {"timezone": "Asia/Tokyo"})]), Text("done")
    )
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"time in Tokyo {t}")
        events = await client.run_events(accepted["run_id"])
    result = next(e for e in events if e["type"] == "tool_completed")["result"]
    assert result["timezone"] == "Asia/Tokyo"
    assert result["iso"].endswith("+09:00")


async def test_search_history_finds_only_the_callers_own_messages(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    secret_word = f"zebra{uuid.uuid4().hex[:6]}"
    async with server.connect(unique_user("other")) as other:
        accepted = await other.ask(f"my password is {secret_word}-other")
        await other.run_events(accepted["run_id"])
    t = fake_llm.script(
        trigger(), ToolCall([("search_history", {"query": secret_word})]), Text("ok")
    )
    async with server.connect(unique_user("me")) as me:
        accepted = await me.ask(f"note {secret_word}-mine")
        await me.run_events(accepted["run_id"])
        accepted = await me.ask(f"search please {t}")
        events = await me.run_events(accepted["run_id"])
    result = next(e for e in events if e["type"] == "tool_completed")["result"]
    texts = [m["text"] for m in result["matches"]]
    assert f"note {secret_word}-mine" in texts
    assert not any("-other" in text for text in texts)


async def test_model_calling_an_unknown_tool_still_ends_the_run(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    t = fake_llm.script(trigger(), ToolCall([("rm_rf", {"path": "/"})]), Text("sorry"))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"unknown tool {t}")
        events = await client.run_events(accepted["run_id"])
    assert events[-1]["type"] in TERMINAL
    assert "tool_executing" not in types(events)


async def test_per_user_concurrency_limit_rejects_with_rate_limited(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(MAX_RUNS_PER_USER="1")
    t = fake_llm.script(trigger(), Text("x" * 20, chunk=2, delay_s=0.1))
    async with server.connect(unique_user()) as client:
        first = await client.ask(f"long {t}")
        refused = await client.ask("second", client_message_id="second-1")
        events = await client.run_events(first["run_id"])
        retried = await client.ask("second", client_message_id="second-1")
    assert refused["type"] == "error"
    assert refused["code"] == "rate_limited"
    assert refused["client_message_id"] == "second-1"
    assert events[-1]["type"] == "agent_completed"
    assert retried["type"] == "message_accepted"


async def test_global_capacity_rejects_with_server_busy(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(MAX_CONCURRENT_RUNS="1")
    t = fake_llm.script(trigger(), Text("x" * 20, chunk=2, delay_s=0.1))
    async with server.connect(unique_user()) as a, server.connect(unique_user()) as b:
        first = await a.ask(f"long {t}")
        refused = await b.ask("me too")
        await a.run_events(first["run_id"])
    assert refused["type"] == "error"
    assert refused["code"] == "server_busy"


async def test_message_rate_limit_per_minute(spawn: SpawnServer) -> None:
    server = spawn(RATE_LIMIT_PER_MINUTE="2")
    async with server.connect(unique_user()) as client:
        for _ in range(2):
            accepted = await client.ask("hi")
            await client.run_events(accepted["run_id"])
        refused = await client.ask("third")
    assert refused["code"] == "rate_limited"


async def test_unknown_agent_is_an_invalid_message(server: ServerProcess) -> None:
    async with server.connect(unique_user()) as client:
        error = await client.ask("hi", agent="does-not-exist")
    assert error["type"] == "error"
    assert error["code"] == "invalid_message"
    assert "agent" in error["message"]


async def test_posting_into_another_users_thread_is_not_found(server: ServerProcess) -> None:
    async with server.connect(unique_user()) as owner:
        accepted = await owner.ask("private")
        await owner.run_events(accepted["run_id"])
    async with server.connect(unique_user()) as intruder:
        error = await intruder.ask("let me in", thread_id=accepted["thread_id"])
        unknown = await intruder.ask("nope", thread_id=str(uuid.uuid4()))
    assert error["code"] == unknown["code"] == "not_found"
    # The same words whether the thread exists for someone else or not at all.
    assert error["message"] == f"thread {accepted['thread_id']} not found"


async def test_every_connection_of_the_user_sees_the_run_live(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    user = unique_user()
    async with server.connect(user) as phone, server.connect(user) as laptop:
        accepted = await phone.ask("hello from the phone")
        on_phone = await phone.run_events(accepted["run_id"])
        on_laptop = await laptop.run_events(accepted["run_id"])
    assert on_phone == on_laptop


@pytest.mark.parametrize("tool_kind", ["slow", "raises"])
async def test_custom_tool_that_hangs_or_raises_is_a_tool_error(
    spawn: SpawnServer, fake_llm: FakeLLM, tmp_path: Any, tool_kind: str
) -> None:
    module = tmp_path / "plugins" / "custom_tools.py"
    module.parent.mkdir()
    module.write_text(
        "import asyncio\n"
        "from pydantic_ai import RunContext\n"
        "async def slow(ctx: RunContext) -> str:\n"
        "    '''Takes forever.'''\n"
        "    await asyncio.sleep(30)\n"
        "    return 'late'\n"
        "async def raises(ctx: RunContext) -> str:\n"
        "    '''Always fails.'''\n"
        "    raise RuntimeError('boom with secret details')\n"
        "TOOLS = [slow, raises]\n"
    )
    server = spawn(
        EXTRA_TOOLS="custom_tools:TOOLS",
        PYTHONPATH=str(module.parent),
        TOOL_TIMEOUT_S="0.5",
    )
    t = fake_llm.script(trigger(), ToolCall([(tool_kind, {})]), Text("recovered"))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"use {tool_kind} {t}")
        events = await client.run_events(accepted["run_id"])
    completed = next(e for e in events if e["type"] == "tool_completed")
    assert completed["status"] == "error"
    if tool_kind == "slow":
        assert "timed out" in completed["error"]
    else:
        assert completed["error"] == "tool failed: RuntimeError"
    assert events[-1]["type"] == "agent_completed"
