"""Runs end to end: a real server, the scripted LLM over HTTP, a real WebSocket client."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import SpawnServer
from tests.fakes.llm_server import FakeLLM, Flaky, Hang, HttpError, Text, ToolCall
from tests.harness import (
    TERMINAL,
    ServerProcess,
    make_token,
    refusing_port,
    tool_plugin,
    trigger,
    unique_user,
)


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


def deltas(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "agent_message_delta")


async def metrics(server: ServerProcess) -> str:
    async with httpx.AsyncClient(base_url=server.http) as http:
        return (await http.get("/metrics")).text


async def stored_events(server: ServerProcess, user: str, thread_id: str) -> list[dict[str, Any]]:
    """The thread's event log, as the HTTP API returns it (the frames exactly as sent)."""
    async with httpx.AsyncClient(base_url=server.http) as http:
        response = await http.get(
            f"/api/threads/{thread_id}/events",
            headers={"Authorization": f"Bearer {make_token(user)}"},
        )
    return list(response.json()["events"])


async def messages(server: ServerProcess, user: str, thread_id: str) -> list[tuple[str, str]]:
    async with httpx.AsyncClient(base_url=server.http) as http:
        response = await http.get(
            f"/api/threads/{thread_id}/messages",
            headers={"Authorization": f"Bearer {make_token(user)}"},
        )
    return [(m["role"], m["content"]) for m in response.json()["messages"]]


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


async def test_stop_agent_cancels_a_running_run_with_exactly_one_terminal_event(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    t = fake_llm.script(trigger(), Text("word " * 200, chunk=5, delay_s=0.05))
    user = unique_user()
    async with server.connect(user) as client:
        accepted = await client.ask(f"talk a lot {t}")
        await client.recv_type("agent_message_delta")
        await client.send({"type": "stop_agent", "run_id": accepted["run_id"]})
        events = await client.run_events(accepted["run_id"])
        await client.settle()  # anything of the run after its terminal event would show here
    stored = await stored_events(server, user, accepted["thread_id"])
    assert events[-1]["type"] == "agent_cancelled"
    assert events[-1]["reason"] == "user_requested"
    assert client.events_of(accepted["run_id"]) == events  # nothing came after it, live
    assert [e for e in stored if e["type"] in TERMINAL] == [events[-1]]  # nor in the log
    assert stored == events
    assert 0 < len(deltas(events)) < len("word " * 200)


async def test_stop_of_unknown_finished_or_foreign_finished_run_is_not_found(
    server: ServerProcess,
) -> None:
    async with server.connect(unique_user()) as owner, server.connect(unique_user()) as other:
        accepted = await owner.ask("hello")
        await owner.run_events(accepted["run_id"])
        await owner.send({"type": "stop_agent", "run_id": accepted["run_id"]})
        finished = await owner.recv_type("error")
        await owner.send({"type": "stop_agent", "run_id": str(uuid.uuid4())})
        unknown = await owner.recv_type("error")
        await other.send({"type": "stop_agent", "run_id": accepted["run_id"]})
        foreign = await other.recv_type("error")
    assert finished["code"] == unknown["code"] == foreign["code"] == "not_found"
    # The same words whether the run is someone else's or does not exist.
    assert foreign["message"] == finished["message"]


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
        events = await client.run_events(accepted["run_id"])
    assert types(events) == ["agent_started", "agent_thinking", "agent_error"]
    assert events[-1]["code"] == "llm_unavailable"
    assert events[-1]["retryable"] is True


async def test_provider_rejecting_the_request_is_a_non_retryable_llm_error(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    t = fake_llm.script(trigger(), HttpError(400, "context too long"))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"reject {t}")
        events = await client.run_events(accepted["run_id"])
    assert events[-1]["type"] == "agent_error"
    assert events[-1]["code"] == "llm_error"
    assert events[-1]["retryable"] is False


async def test_provider_refusing_the_api_key_is_a_non_retryable_llm_error(
    spawn: SpawnServer, private_llm: FakeLLM
) -> None:
    private_llm.api_key = "sk-the-right-key"
    wrong = spawn(LLM_BASE_URL=private_llm.base_url, LLM_API_KEY="sk-a-wrong-key")
    right = spawn(LLM_BASE_URL=private_llm.base_url, LLM_API_KEY="sk-the-right-key")
    async with wrong.connect(unique_user()) as client:
        accepted = await client.ask("hello with a wrong key")
        refused = await client.run_events(accepted["run_id"])
    async with right.connect(unique_user()) as client:
        accepted = await client.ask("hello with the right key")
        answered = await client.run_events(accepted["run_id"])
    assert refused[-1]["type"] == "agent_error"
    assert refused[-1]["code"] == "llm_error"
    assert refused[-1]["retryable"] is False
    assert "sk-a-wrong-key" not in refused[-1]["message"]
    assert answered[-1]["type"] == "agent_completed"
    assert answered[-1]["content"] == "echo: hello with the right key"


async def test_model_requests_carry_the_sdks_organization_and_project_and_ask_for_no_compression(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(OPENAI_ORG_ID="org-parley-test", OPENAI_PROJECT_ID="proj-parley-test")
    t = fake_llm.script(trigger(), Text("headers seen"))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"which headers {t}")
        events = await client.run_events(accepted["run_id"])
    assert events[-1]["content"] == "headers seen"
    (seen,) = fake_llm.seen_with(t)
    assert seen.headers["openai-organization"] == "org-parley-test"
    assert seen.headers["openai-project"] == "proj-parley-test"
    # The answer is read line by line as it streams: a compressed body could not be.
    assert seen.headers["accept-encoding"] == "identity"
    assert seen.headers["authorization"].startswith("Bearer ")


async def test_model_requests_go_through_the_proxy_the_environment_names(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    # The provider's name does not resolve: only the proxy (here the scripted provider itself,
    # which serves a proxied request's path) can carry the request.
    server = spawn(
        LLM_BASE_URL="http://provider.invalid/v1", HTTP_PROXY=f"http://127.0.0.1:{fake_llm.port}"
    )
    t = fake_llm.script(trigger(), Text("through the proxy"))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"proxied {t}")
        events = await client.run_events(accepted["run_id"])
    assert events[-1]["type"] == "agent_completed", events[-1]
    assert events[-1]["content"] == "through the proxy"
    (seen,) = fake_llm.seen_with(t)
    assert seen.headers["host"] == "provider.invalid"


async def test_a_base_url_that_redirects_is_followed_as_the_sdk_follows_it(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(LLM_BASE_URL=f"http://127.0.0.1:{fake_llm.port}/moved/v1")
    async with server.connect(unique_user()) as client:
        for n in range(2):  # the first request learns of the redirect, the second follows it
            t = fake_llm.script(trigger(), Text(f"moved answer {n}"))
            accepted = await client.ask(f"where are you {t}")
            events = await client.run_events(accepted["run_id"])
            assert events[-1]["type"] == "agent_completed", events[-1]
            assert events[-1]["content"] == deltas(events) == f"moved answer {n}"
            assert len(fake_llm.seen_with(t)) == 1  # answered once, where the redirect led
    assert server.read_log().count("llm.endpoint_redirects") == 1  # said once


@pytest.mark.parametrize("failure", ["error_event", "disconnect"])
async def test_provider_failing_after_half_the_answer_ends_the_run_once_with_what_was_streamed(
    server: ServerProcess, fake_llm: FakeLLM, failure: str
) -> None:
    answer = "".join(f"part{i:02d} " for i in range(20))
    half = len(answer) // 2
    t = fake_llm.script(
        trigger(), Text(answer, chunk=7, delay_s=0.01, fail_after=half, failure=failure)
    )
    user = unique_user()
    async with server.connect(user) as client:
        accepted = await client.ask(f"break halfway {t}")
        events = await client.run_events(accepted["run_id"])
        await client.settle()
    stored = await stored_events(server, user, accepted["thread_id"])
    assert events[-1]["type"] == "agent_error"
    assert events[-1]["code"] == "llm_unavailable"
    assert events[-1]["retryable"] is True
    assert deltas(events) == answer[:half]  # the text that streamed, each piece once
    assert stored == events
    # A failed run stores no answer: the thread holds the question only.
    assert await messages(server, user, accepted["thread_id"]) == [("user", f"break halfway {t}")]


async def test_usage_is_requested_when_streaming_and_zero_when_the_provider_sends_none(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    t = fake_llm.script(trigger(), Text("no usage here", usage=False))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"count nothing {t}")
        events = await client.run_events(accepted["run_id"])
    assert events[-1]["type"] == "agent_completed"
    assert events[-1]["content"] == deltas(events) == "no usage here"
    assert events[-1]["usage"] == {"input_tokens": 0, "output_tokens": 0}
    request = fake_llm.requests_with(t)[0]
    assert request["stream"] is True
    assert request["stream_options"]["include_usage"] is True


async def test_provider_reasoning_text_is_sent_as_agent_thinking(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    reasoning = "The user greets me; a short friendly reply will do."
    t = fake_llm.script(trigger(), Text("Hello!", reasoning=reasoning))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"hi there {t}")
        events = await client.run_events(accepted["run_id"])
    thoughts = [e["text"] for e in events if e["type"] == "agent_thinking"]
    assert reasoning in thoughts
    assert events[-1]["content"] == deltas(events) == "Hello!"


async def test_retries_are_on_by_default_so_a_provider_that_recovers_completes_the_run(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(LLM_MAX_RETRIES="", LLM_CIRCUIT_FAILURE_THRESHOLD="1")  # the defaults
    t = fake_llm.script(trigger(), Flaky(HttpError(500), Text("second time lucky")))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"try again {t}")
        events = await client.run_events(accepted["run_id"])
        after = await client.ask("and the circuit is still closed?")
        next_run = await client.run_events(after["run_id"])
    assert events[-1]["type"] == "agent_completed"
    assert events[-1]["content"] == deltas(events) == "second time lucky"
    assert len(fake_llm.requests_with(t)) == 2  # the failure, then the SDK's one retry
    # A request that succeeded on its retry is no outage: with a threshold of one failure
    # the circuit stays closed.
    assert next_run[-1]["type"] == "agent_completed"
    assert 'parley_llm_circuit_open{provider="openai"} 0.0' in await metrics(server)


async def test_provider_429_is_retried_after_its_retry_after_then_ends_in_llm_unavailable(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(LLM_MAX_RETRIES="")  # the default: one retry
    t = fake_llm.script(trigger(), HttpError(429, "slow down", retry_after="1"))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"too many {t}")
        events = await client.run_events(accepted["run_id"])
    seen = fake_llm.seen_with(t)
    assert len(seen) == 2
    assert seen[1].at - seen[0].at >= 0.9  # the SDK waited as the provider asked
    assert events[-1]["type"] == "agent_error"
    assert events[-1]["code"] == "llm_unavailable"
    assert events[-1]["retryable"] is True


async def test_retry_policy_follows_the_providers_headers_as_the_openai_sdk_does(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(LLM_MAX_RETRIES="2", LLM_CIRCUIT_FAILURE_THRESHOLD="100")
    # A named wait beyond two minutes is not waited for: no retry at all.
    too_long = fake_llm.script(trigger(), HttpError(429, retry_after="600"))
    # `x-should-retry` decides over the status: a 503 the provider says not to retry...
    not_again = fake_llm.script(trigger(), HttpError(503, headers=(("x-should-retry", "false"),)))
    # ...and a 400 it says to retry (which then succeeds).
    again = fake_llm.script(
        trigger(), Flaky(HttpError(400, headers=(("x-should-retry", "true"),)), Text("ok then"))
    )
    # `retry-after-ms` wins over `Retry-After`, and over the backoff (at most 0.5 s here).
    waited = fake_llm.script(
        trigger(),
        Flaky(HttpError(429, retry_after="30", headers=(("retry-after-ms", "1200"),)), Text("hi")),
    )
    async with server.connect(unique_user()) as client:
        ends = {}
        for t in (too_long, not_again, again, waited):
            accepted = await client.ask(f"policy {t}")
            ends[t] = (await client.run_events(accepted["run_id"]))[-1]
    assert len(fake_llm.requests_with(too_long)) == 1
    assert ends[too_long]["code"] == "llm_unavailable"
    assert len(fake_llm.requests_with(not_again)) == 1
    assert ends[not_again]["code"] == "llm_unavailable"
    assert len(fake_llm.requests_with(again)) == 2
    assert ends[again]["content"] == "ok then"
    seen = fake_llm.seen_with(waited)
    assert len(seen) == 2
    assert 1.15 <= seen[1].at - seen[0].at < 5.0
    assert ends[waited]["content"] == "hi"


async def test_each_run_counts_once_toward_the_circuit_however_often_it_was_retried(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(LLM_MAX_RETRIES="", LLM_CIRCUIT_FAILURE_THRESHOLD="2", LLM_CIRCUIT_RESET_S="60")
    t = fake_llm.script(trigger(), HttpError(503))
    async with server.connect(unique_user()) as client:
        codes = []
        for expected_requests in (2, 4):
            accepted = await client.ask(f"down {t}")
            events = await client.run_events(accepted["run_id"])
            codes.append(events[-1]["code"])
            assert len(fake_llm.requests_with(t)) == expected_requests  # each run: try + retry
        accepted = await client.ask(f"down {t}")
        refused = await client.run_events(accepted["run_id"])
    assert codes == ["llm_unavailable", "llm_unavailable"]
    assert refused[-1]["code"] == "llm_unavailable"
    assert "circuit" in refused[-1]["message"]
    assert len(fake_llm.requests_with(t)) == 4  # the open circuit sent nothing


async def test_unreachable_provider_ends_runs_with_llm_unavailable_then_circuit_opens(
    spawn: SpawnServer,
) -> None:
    with refusing_port() as port:
        server = spawn(
            LLM_BASE_URL=f"http://127.0.0.1:{port}/v1",
            LLM_CIRCUIT_FAILURE_THRESHOLD="2",
            LLM_CIRCUIT_RESET_S="60",
        )
        async with server.connect(unique_user()) as client:
            for _ in range(2):
                accepted = await client.ask("anyone there?")
                events = await client.run_events(accepted["run_id"])
                assert events[-1]["code"] == "llm_unavailable"
                assert "circuit" not in events[-1]["message"]
                # Named for what happened (the transport calls it a timeout), not a timeout.
                assert "ConnectionRefusedError" in events[-1]["message"], events[-1]
            accepted = await client.ask("and now?")
            events = await client.run_events(accepted["run_id"])
        assert events[-1]["code"] == "llm_unavailable"
        assert "circuit" in events[-1]["message"]
        ready = await poll_readiness(server, 503)
        assert ready["components"]["llm"]["status"] == "down"
        assert 'parley_llm_circuit_open{provider="openai"} 1.0' in await metrics(server)


async def test_circuit_closes_again_after_its_reset_time_and_readiness_returns_to_200(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    # The circuit stays open for 3 s: longer than readiness is cached (up to 1 s), so the poll
    # below sees it open before it turns half-open.
    server = spawn(LLM_CIRCUIT_FAILURE_THRESHOLD="2", LLM_CIRCUIT_RESET_S="3")
    t = fake_llm.script(trigger(), HttpError(500))
    async with server.connect(unique_user()) as client:
        for _ in range(2):
            accepted = await client.ask(f"down {t}")
            await client.run_events(accepted["run_id"])
        opened = time.monotonic()
        down = await poll_readiness(server, 503)
        # Past LLM_CIRCUIT_RESET_S: the next request is a trial.
        await asyncio.sleep(max(0.0, opened + 3.2 - time.monotonic()))
        accepted = await client.ask("is the provider back?")
        events = await client.run_events(accepted["run_id"])
        up = await poll_readiness(server, 200)
    assert down["components"]["llm"]["circuit"] == "open"
    assert events[-1]["type"] == "agent_completed"
    assert up["components"]["llm"]["status"] == "ok"
    assert up["components"]["llm"]["circuit"] == "closed"
    assert 'parley_llm_circuit_open{provider="openai"} 0.0' in await metrics(server)


async def hung_run(server: ServerProcess, fake_llm: FakeLLM) -> tuple[list[dict[str, Any]], float]:
    """A run whose provider hangs for 20 s: its events (it must end within 15 s) and the seconds
    from its acceptance to its end."""
    t = fake_llm.script(trigger(), Hang(20))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"hang {t}")
        started = time.monotonic()
        events = await client.run_events(accepted["run_id"], timeout=15)
        elapsed = time.monotonic() - started
    return events, elapsed


async def test_provider_slower_than_llm_timeout_s_ends_the_run_with_llm_unavailable(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    events, elapsed = await hung_run(spawn(LLM_TIMEOUT_S="1", RUN_TIMEOUT_S="30"), fake_llm)
    assert events[-1]["type"] == "agent_error"
    assert events[-1]["code"] == "llm_unavailable"  # the provider timed out, not the run
    assert events[-1]["retryable"] is True
    assert elapsed < 15


async def test_provider_stalling_mid_answer_longer_than_llm_timeout_s_ends_the_run_once(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    # Each piece comes well within the timeout until the stall: the read timeout is measured
    # from the last piece, not from the request.
    answer = "".join(f"piece{i:02d} " for i in range(12))
    half = len(answer) // 2
    server = spawn(LLM_TIMEOUT_S="1", RUN_TIMEOUT_S="30")
    t = fake_llm.script(trigger(), Text(answer, chunk=8, delay_s=0.3, pause_after=half, pause_s=20))
    user = unique_user()
    async with server.connect(user) as client:
        accepted = await client.ask(f"stall halfway {t}")
        started = time.monotonic()
        events = await client.run_events(accepted["run_id"], timeout=15)
        elapsed = time.monotonic() - started
    assert events[-1]["type"] == "agent_error"
    assert events[-1]["code"] == "llm_unavailable"
    assert events[-1]["retryable"] is True
    assert deltas(events) == answer[:half]  # what came before the stall, once
    # The pieces before the stall took ~2.1 s, then the 1 s timeout: measured from the request
    # it would have ended after 1 s.
    assert 2.5 <= elapsed < 12
    assert await stored_events(server, user, accepted["thread_id"]) == events


async def test_run_that_exceeds_its_deadline_ends_with_timeout(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    events, elapsed = await hung_run(spawn(RUN_TIMEOUT_S="2", LLM_TIMEOUT_S="30"), fake_llm)
    assert events[-1]["type"] == "agent_error"
    assert events[-1]["code"] == "timeout"
    assert events[-1]["retryable"] is True
    # Ended by the deadline (not by the provider, which hangs for 20 s); a loose upper bound
    # keeps a loaded CI machine from failing it.
    assert 1.0 <= elapsed < 10


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


async def test_model_calling_an_unknown_tool_is_told_so_and_the_run_completes(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    t = fake_llm.script(trigger(), ToolCall([("rm_rf", {"path": "/"})]), Text("sorry"))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"unknown tool {t}")
        events = await client.run_events(accepted["run_id"])
    assert events[-1]["type"] == "agent_completed"
    assert events[-1]["content"] == "sorry"
    assert "tool_executing" not in types(events)
    # The agent loop answered the model that the tool does not exist.
    retry = fake_llm.requests_with(t)[1]["messages"]
    assert any("rm_rf" in json.dumps(m) for m in retry if m["role"] == "tool")


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


async def test_messages_beyond_the_per_minute_limit_are_rate_limited(spawn: SpawnServer) -> None:
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
    tools = tool_plugin(
        tmp_path,
        "custom_tools",
        "import asyncio\n"
        "from pydantic_ai import RunContext\n"
        "async def slow(ctx: RunContext) -> str:\n"
        "    '''Takes forever.'''\n"
        "    await asyncio.sleep(30)\n"
        "    return 'late'\n"
        "async def raises(ctx: RunContext) -> str:\n"
        "    '''Always fails.'''\n"
        "    raise RuntimeError('boom with secret details')\n"
        "TOOLS = [slow, raises]\n",
    )
    server = spawn(**tools, TOOL_TIMEOUT_S="0.5")
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


async def test_a_tool_that_returns_nothing_completes_ok_with_a_null_result(
    spawn: SpawnServer, fake_llm: FakeLLM, tmp_path: Any
) -> None:
    tools = tool_plugin(
        tmp_path,
        "quiet_tools",
        "from pydantic_ai import RunContext\n"
        "async def forget(ctx: RunContext) -> None:\n"
        "    '''Forgets the conversation; returns nothing.'''\n"
        "TOOLS = [forget]\n",
    )
    server = spawn(**tools)
    t = fake_llm.script(trigger(), ToolCall([("forget", {})]), Text("done"))
    user = unique_user()
    async with server.connect(user) as client:
        accepted = await client.ask(f"forget it {t}")
        events = await client.run_events(accepted["run_id"])
    async with server.connect(user) as later:
        replayed = await later.replay(accepted["thread_id"])
    completed = next(e for e in events if e["type"] == "tool_completed")
    assert completed["status"] == "ok"
    assert "result" in completed
    assert completed["result"] is None
    assert "error" not in completed
    assert completed in replayed  # stored as sent
    assert events[-1]["type"] == "agent_completed"


async def test_tool_call_arguments_streamed_one_character_a_chunk_arrive_whole(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    calls = [
        ("calculator", {"expression": "((1 + 2) * 3 - 4) / 5"}),
        ("current_time", {"timezone": "America/Argentina/Buenos_Aires"}),
    ]
    t = fake_llm.script(trigger(), ToolCall(calls, arg_chunk=1), Text("both done"))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"two tools in pieces {t}")
        events = await client.run_events(accepted["run_id"])
    executing = [(e["tool"], e["arguments"]) for e in events if e["type"] == "tool_executing"]
    completed = [e for e in events if e["type"] == "tool_completed"]
    assert sorted(executing) == sorted(calls)
    assert [e["status"] for e in completed] == ["ok", "ok"]
    assert {e["tool"]: e.get("result") for e in completed}["calculator"]["result"] == 1
    assert events[-1]["type"] == "agent_completed"


async def test_only_history_messages_earlier_messages_are_sent_to_the_model(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(HISTORY_MESSAGES="2")
    t = trigger()
    async with server.connect(unique_user()) as client:
        thread_id = None
        for text in ("first", "second", "third", f"fourth {t}"):
            fields = {"thread_id": thread_id} if thread_id else {}
            accepted = await client.ask(text, **fields)
            thread_id = accepted["thread_id"]
            await client.run_events(accepted["run_id"])
    sent = fake_llm.requests_with(t)[0]["messages"]
    assert [(m["role"], m["content"]) for m in sent if m["role"] != "system"] == [
        ("user", "third"),
        ("assistant", "echo: third"),
        ("user", f"fourth {t}"),
    ]


async def test_tool_result_over_tool_result_max_bytes_is_a_tool_error_the_model_sees(
    spawn: SpawnServer, fake_llm: FakeLLM, tmp_path: Any
) -> None:
    tools = tool_plugin(
        tmp_path,
        "big_tools",
        "from pydantic_ai import RunContext\n"
        "async def big(ctx: RunContext, size: int) -> str:\n"
        "    '''Returns `size` characters.'''\n"
        "    return 'x' * size\n"
        "TOOLS = [big]\n",
    )
    server = spawn(**tools, TOOL_RESULT_MAX_BYTES="300")
    t = fake_llm.script(
        trigger(), ToolCall([("big", {"size": 200}), ("big", {"size": 400})]), Text("ok")
    )
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"big results {t}")
        events = await client.run_events(accepted["run_id"])
    small, large = sorted(
        (e for e in events if e["type"] == "tool_completed"), key=lambda e: e["status"]
    )[::-1]
    assert small["status"] == "ok"
    assert small["result"] == "x" * 200
    assert large["status"] == "error"
    assert large["error"] == "result larger than 300 bytes"
    assert "result" not in large or large["result"] is None
    assert events[-1]["type"] == "agent_completed"
    tool_messages = [m for m in fake_llm.requests_with(t)[1]["messages"] if m["role"] == "tool"]
    assert any("result larger than 300 bytes" in m["content"] for m in tool_messages)
    assert not any("x" * 400 in m["content"] for m in tool_messages)
