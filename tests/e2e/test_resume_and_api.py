"""Resume after a disconnect, and the HTTP API over the same persisted data."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.fakes.llm_server import FakeLLM, Text
from tests.harness import TERMINAL, ServerProcess, make_token, metric, trigger, unique_user


async def test_resume_after_a_disconnect_mid_run_delivers_each_missed_event_once_in_order(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    user = unique_user()
    answer = " ".join(f"w{i}" for i in range(60))
    t = fake_llm.script(trigger(), Text(answer, chunk=6, delay_s=0.03))
    seen: list[dict[str, Any]] = []
    async with server.connect(user) as client:
        accepted = await client.ask(f"long answer {t}")
        while len([e for e in seen if e["type"] == "agent_message_delta"]) < 3:
            frame = await client.recv()
            if frame.get("run_id") == accepted["run_id"]:
                seen.append(frame)
    # Disconnected in the middle of the run; it goes on without us.
    last_seq = seen[-1]["seq"]
    async with server.connect(user) as client:
        await client.send(
            {"type": "resume", "thread_id": accepted["thread_id"], "after_seq": last_seq}
        )
        rest: list[dict[str, Any]] = []
        complete: dict[str, Any] | None = None
        while complete is None or not any(e["type"] in TERMINAL for e in rest):
            frame = await client.recv()
            if frame["type"] == "resume_complete":
                complete = frame
            elif frame.get("run_id") == accepted["run_id"]:
                rest.append(frame)
    everything = seen + rest
    assert [e["seq"] for e in everything] == list(range(1, len(everything) + 1))
    assert everything[-1]["type"] == "agent_completed"
    deltas = "".join(e["text"] for e in everything if e["type"] == "agent_message_delta")
    assert deltas == everything[-1]["content"] == answer
    assert complete["thread_id"] == accepted["thread_id"]
    assert complete["last_seq"] >= last_seq


async def test_resume_of_a_finished_thread_replays_exactly_the_events_after_seq(
    server: ServerProcess,
) -> None:
    user = unique_user()
    async with server.connect(user) as client:
        accepted = await client.ask("remember this")
        live = await client.run_events(accepted["run_id"])
    async with server.connect(user) as client:
        await client.send({"type": "resume", "thread_id": accepted["thread_id"], "after_seq": 2})
        replayed = []
        while (frame := await client.recv())["type"] != "resume_complete":
            replayed.append(frame)
        await client.send({"type": "resume", "thread_id": accepted["thread_id"], "after_seq": 0})
        full = []
        while (frame := await client.recv())["type"] != "resume_complete":
            full.append(frame)
    assert replayed == live[2:]
    assert full == live
    assert frame["last_seq"] == live[-1]["seq"]


async def test_resume_past_the_end_replays_nothing(server: ServerProcess) -> None:
    user = unique_user()
    async with server.connect(user) as client:
        accepted = await client.ask("short")
        live = await client.run_events(accepted["run_id"])
        await client.send(
            {"type": "resume", "thread_id": accepted["thread_id"], "after_seq": live[-1]["seq"]}
        )
        complete = await client.recv()
    assert complete["type"] == "resume_complete"
    assert complete["last_seq"] == live[-1]["seq"]


async def test_live_events_sent_before_a_resume_are_not_sent_twice(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    user = unique_user()
    t = fake_llm.script(trigger(), Text("abcdefghij" * 6, chunk=3, delay_s=0.03))
    async with server.connect(user) as first:
        accepted = await first.ask(f"go {t}")
        async with server.connect(user) as second:
            # `second` sees live events, then asks to resume from the start of the thread.
            early = [await second.recv() for _ in range(3)]
            await second.send(
                {"type": "resume", "thread_id": accepted["thread_id"], "after_seq": 0}
            )
            later: list[dict[str, Any]] = []
            done = False
            while not done:
                frame = await second.recv()
                if frame["type"] == "resume_complete":
                    continue
                later.append(frame)
                done = frame["type"] in TERMINAL
    # Live events sent before the server read the resume (those the client had read, and any
    # still in flight: e.g. a burst released at the end of the connection's hold window) are
    # not replayed; the replay fills the gap before them, in order, and then live delivery
    # goes on in order. Nothing arrives twice and nothing is missing.
    early_seqs = [e["seq"] for e in early]
    later_seqs = [e["seq"] for e in later]
    assert early_seqs == list(range(early_seqs[0], early_seqs[0] + 3))
    missed = list(range(1, early_seqs[0]))
    in_flight = later_seqs[: later_seqs.index(1)] if missed else []
    after = later_seqs[len(in_flight) + len(missed) :]
    assert in_flight == list(range(early_seqs[-1] + 1, early_seqs[-1] + 1 + len(in_flight)))
    assert later_seqs[len(in_flight) : len(in_flight) + len(missed)] == missed
    resumed_from = in_flight[-1] if in_flight else early_seqs[-1]
    assert after == list(range(resumed_from + 1, later_seqs[-1] + 1))
    assert sorted(early_seqs + later_seqs) == list(range(1, later_seqs[-1] + 1))


async def test_resume_of_another_users_or_unknown_thread_is_not_found(
    server: ServerProcess,
) -> None:
    async with server.connect(unique_user()) as owner:
        accepted = await owner.ask("mine")
        await owner.run_events(accepted["run_id"])
    async with server.connect(unique_user()) as intruder:
        await intruder.send({"type": "resume", "thread_id": accepted["thread_id"], "after_seq": 0})
        foreign = await intruder.recv()
        await intruder.send({"type": "resume", "thread_id": str(uuid.uuid4()), "after_seq": 0})
        unknown = await intruder.recv()
    assert foreign["type"] == unknown["type"] == "error"
    assert foreign["code"] == unknown["code"] == "not_found"


async def test_http_api_lists_own_threads_messages_and_events(server: ServerProcess) -> None:
    user = unique_user()
    async with server.connect(user) as client:
        accepted = await client.ask("hello api")
        live = await client.run_events(accepted["run_id"])
    headers = {"Authorization": f"Bearer {make_token(user)}"}
    async with httpx.AsyncClient(base_url=server.http, headers=headers) as http:
        threads = (await http.get("/api/threads")).json()["threads"]
        messages = (await http.get(f"/api/threads/{accepted['thread_id']}/messages")).json()
        events = (await http.get(f"/api/threads/{accepted['thread_id']}/events?after_seq=1")).json()
        bad_seq = await http.get(f"/api/threads/{accepted['thread_id']}/events?after_seq=-1")
        path = f"/api/threads/{accepted['thread_id']}/events"
        pages = [
            (await http.get(path, params={"after_seq": after, "limit": 2})).json()["events"]
            for after in range(0, len(live), 2)
        ]
        bad_limits = [
            (await http.get(path, params={"limit": limit})).status_code for limit in (0, 1001)
        ]
    assert [t["id"] for t in threads] == [accepted["thread_id"]]
    assert threads[0]["title"] == "hello api"
    assert [(m["role"], m["content"]) for m in messages["messages"]] == [
        ("user", "hello api"),
        ("assistant", "echo: hello api"),
    ]
    assert events["events"] == live[1:]
    assert bad_seq.status_code == 422
    assert [len(page) for page in pages[:-1]] == [2] * (len(pages) - 1)
    assert [e for page in pages for e in page] == live  # `limit` pages through, in order
    assert bad_limits == [422, 422]


async def test_http_api_hides_other_users_threads_and_requires_a_token(
    server: ServerProcess,
) -> None:
    async with server.connect(unique_user()) as owner:
        accepted = await owner.ask("secret")
        await owner.run_events(accepted["run_id"])
    thread = accepted["thread_id"]
    other = {"Authorization": f"Bearer {make_token(unique_user())}"}
    unknown = str(uuid.uuid4())
    bad = {"Authorization": "Bearer " + make_token("x", ttl=-100)}
    async with httpx.AsyncClient(base_url=server.http) as http:
        assert (await http.get("/api/threads", headers=other)).json() == {"threads": []}
        for path in (
            f"/api/threads/{thread}/messages",
            f"/api/threads/{thread}/events",
            f"/api/threads/{unknown}/messages",
            f"/api/threads/{unknown}/events",
        ):
            hidden = await http.get(path, headers=other)
            assert hidden.status_code == 404, path
            assert hidden.json() == {"detail": "thread not found"}, path
            for headers in ({}, bad):
                refused = await http.get(path, headers=headers)
                assert refused.status_code == 401, path
                assert refused.headers["www-authenticate"] == "Bearer", path


async def test_health_and_metrics(server: ServerProcess) -> None:
    async with server.connect(unique_user()) as client:
        async with httpx.AsyncClient(base_url=server.http) as http:
            before = (await http.get("/metrics")).text
        accepted = await client.ask("count me")
        await client.run_events(accepted["run_id"])
        async with httpx.AsyncClient(base_url=server.http) as http:
            live = await http.get("/health/live")
            ready = await http.get("/health/ready")
            metrics = await http.get("/metrics")
    assert live.json() == {"status": "ok"}
    body = ready.json()
    assert ready.status_code == 200
    assert body["status"] == "ready"
    for component in ("database", "llm", "tools", "supervisor", "event_bus"):
        assert body["components"][component]["status"] == "ok", component
    assert body["components"]["llm"]["model"] == "fake-model"
    assert metrics.headers["content-type"].startswith("text/plain")
    assert metric(metrics.text, "parley_connections_open") >= 1  # this test's connection
    completed = 'parley_runs_total{outcome="completed"}'
    # Before this test's run, no run may have completed yet on the shared server.
    assert metric(metrics.text, completed) == metric(before, completed, absent=0.0) + 1
