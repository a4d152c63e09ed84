"""Hostile and careless input against a real server: every bad frame or request gets a clear,
documented answer, the connection stays open, and nothing reaches the database that it cannot
store. On SQLite and on PostgreSQL alike (issue 14)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests import harness
from tests.conftest import SpawnServer
from tests.harness import Client, ServerProcess, make_token, metric, unique_user

MAX_SEQ = 2**31 - 1  # docs/protocol.md: the largest seq any backend's INTEGER column holds


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_db(request: pytest.FixtureRequest, spawn: SpawnServer) -> ServerProcess:
    """A server on SQLite (the module's shared one) or on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        shared: ServerProcess = request.getfixturevalue("server")
        return shared
    return spawn(DATABASE_URL=request.getfixturevalue("postgres_url"))


async def refused(client: Client, frame: dict[str, Any] | str, code: str) -> dict[str, Any]:
    """Send `frame`, expect `error code`, and check that the connection still answers."""
    # A raw frame goes straight to the socket: the harness would try to parse it itself.
    await (client.ws.send(frame) if isinstance(frame, str) else client.send(frame))
    answer = await client.recv()
    assert answer["type"] == "error", answer
    assert answer["code"] == code, answer
    await client.send({"type": "ping"})
    assert (await client.recv())["type"] == "pong"
    return answer


async def read_until_closed(ws: websockets.ClientConnection) -> None:
    while True:
        await ws.recv()


def assert_no_traceback(server: ServerProcess) -> None:
    log = server.read_log()
    assert "Traceback" not in log, log[-4000:]
    assert "ERROR" not in log, log[-4000:]


# --------------------------------------------------------------------------- row 1: depth


async def test_json_nested_32000_levels_gets_invalid_json_and_the_socket_stays_open(
    server: ServerProcess,
) -> None:
    async with server.connect(unique_user()) as client:
        for frame in ("[" * 32000 + "]" * 32000, '{"a":' * 10000 + "1" + "}" * 10000):
            answer = await refused(client, frame, "invalid_json")
            assert "nested" in answer["message"]
        # Moderately deep but within the documented bound is still processed.
        await client.send(json.dumps({"type": "ping", "ext": [[[[[[1]]]]]]}))
        assert (await client.recv())["type"] == "pong"
    assert_no_traceback(server)


async def test_numbers_and_constants_json_cannot_hold_get_invalid_json(
    server: ServerProcess,
) -> None:
    async with server.connect(unique_user()) as client:
        await refused(client, '{"type": "ping", "x": NaN}', "invalid_json")
        await refused(client, '{"type": "ping", "x": -Infinity}', "invalid_json")
        await refused(client, '{"type": "ping", "x": ' + "9" * 5000 + "}", "invalid_json")
    assert_no_traceback(server)


# --------------------------------------------------------------------------- row 2: integers


async def test_after_seq_beyond_what_the_database_holds_is_invalid_message(
    any_db: ServerProcess,
) -> None:
    user = unique_user()
    async with any_db.connect(user) as client:
        accepted = await client.ask("hello")
        await client.run_events(accepted["run_id"])
        thread = accepted["thread_id"]
        for after_seq in (MAX_SEQ + 1, 2**63 - 1, 2**63, 2**64, 10**40):
            frame = {"type": "resume", "thread_id": thread, "after_seq": after_seq}
            answer = await refused(client, frame, "invalid_message")
            assert "after_seq" in answer["message"]
        # The bound itself is accepted and compared with the stored seqs.
        await client.send({"type": "resume", "thread_id": thread, "after_seq": MAX_SEQ})
        answer = await client.recv()
        assert (answer["type"], answer["thread_id"]) == ("resume_complete", thread), answer

    headers = {"Authorization": f"Bearer {any_db.token(user)}"}
    async with httpx.AsyncClient(base_url=any_db.http, headers=headers) as http:
        events = f"/api/threads/{thread}/events"
        for query in (
            {"after_seq": str(2**63)},
            {"after_seq": str(MAX_SEQ + 1)},
            {"after_seq": str(10**40)},
            {"limit": str(2**63)},
            {"limit": str(10**40)},
            {"limit": "-1"},
        ):
            response = await http.get(events, params=query)
            assert response.status_code == 422, (query, response.text)
        response = await http.get(events, params={"after_seq": str(MAX_SEQ)})
        assert response.status_code == 200
        assert response.json()["events"] == []
    assert_no_traceback(any_db)


# --------------------------------------------------------------------------- row 3: characters

# JSON escapes (raw strings): the frames stay valid UTF-8 and valid JSON.
UNSTORABLE = {"nul": r"a\u0000b", "lone_surrogate": r"a\ud800b", "low_surrogate": r"\udfff"}


def _frames(bad: str) -> list[tuple[str, str]]:
    """(raw JSON frame, field) with `bad` in each client string the server uses; `bad` is
    a JSON escape, so the frame itself is valid UTF-8 and valid JSON."""
    good_thread = '"thread_id": "00000000-0000-0000-0000-000000000000"'
    return [
        (f'{{"type": "user_message", "content": "{bad}"}}', "content"),
        (
            f'{{"type": "user_message", "content": "hi", "client_message_id": "{bad}"}}',
            "client_message_id",
        ),
        (f'{{"type": "user_message", "content": "hi", "thread_id": "{bad}"}}', "thread_id"),
        (f'{{"type": "user_message", "content": "hi", "agent": "{bad}"}}', "agent"),
        (f'{{"type": "stop_agent", "run_id": "{bad}"}}', "run_id"),
        (f'{{"type": "resume", "thread_id": "{bad}", "after_seq": 0}}', "thread_id"),
        (f'{{"type": "resume", {good_thread}, "after_seq": 0, "x": "{bad}"}}', ""),
    ]


@pytest.mark.parametrize("bad", list(UNSTORABLE.values()), ids=list(UNSTORABLE))
async def test_unstorable_characters_are_invalid_message_naming_the_field(
    any_db: ServerProcess, bad: str
) -> None:
    user = unique_user()
    async with any_db.connect(user) as client:
        for frame, field in _frames(bad):
            if not field:
                # An unknown extension field is ignored, never stored: this one is processed.
                await client.send(frame)
                assert (await client.recv())["code"] == "not_found"
                continue
            answer = await refused(client, frame, "invalid_message")
            assert f"field '{field}'" in answer["message"], (frame, answer)
        # The same user can still post, and nothing of the refused frames was stored.
        accepted = await client.ask("still here", client_message_id="ok-1")
        assert accepted["type"] == "message_accepted"
        assert (await client.run_events(accepted["run_id"]))[-1]["type"] == "agent_completed"
    headers = {"Authorization": f"Bearer {any_db.token(user)}"}
    async with httpx.AsyncClient(base_url=any_db.http, headers=headers) as http:
        threads = (await http.get("/api/threads")).json()["threads"]
        assert [t["title"] for t in threads] == ["still here"]
        for path in ("/api/threads/a%00b/messages", "/api/threads/a%00b/events"):
            response = await http.get(path)
            assert response.status_code == 422, (path, response.text)
        response = await http.get("/api/threads/" + "x" * 65 + "/messages")
        assert response.status_code == 422
    assert_no_traceback(any_db)


# --------------------------------------------------------------------------- row 4: logs


async def test_tokens_in_query_strings_and_headers_never_reach_the_log(spawn: SpawnServer) -> None:
    server = spawn(LOG_LEVEL="DEBUG")  # the libraries log request lines and headers at DEBUG
    token = server.token(unique_user())
    signature = token.rsplit(".", 1)[1]
    # A token in the query string is not a way to authenticate: refused, but never logged.
    async with websockets.connect(f"{server.ws_url}?token={token}") as ws:
        with pytest.raises(ConnectionClosed):
            await read_until_closed(ws)
    async with websockets.connect(server.ws_url, subprotocols=["parley.v1", f"bearer.{token}"]):
        pass
    async with websockets.connect(
        server.ws_url, additional_headers={"Authorization": f"Bearer {token}"}
    ):
        pass
    async with httpx.AsyncClient(base_url=server.http) as http:
        await http.get(f"/health/live?token={token}")
        await http.get(f"/api/threads?token={token}")
    server.stop()
    assert signature not in server.output
    assert '"WebSocket /ws?[redacted]"' in server.output  # the handshake line is still there


# --------------------------------------------------------------------------- row 5: headers

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
STATIC = Path(__file__).parents[2] / "src" / "parley" / "web" / "static"


def csp(response: httpx.Response) -> dict[str, list[str]]:
    policy = response.headers.get("content-security-policy", "")
    directives = (part.split() for part in policy.split(";") if part.strip())
    return {d[0]: d[1:] for d in directives}


def assert_strict(response: httpx.Response) -> None:
    where = f"{response.request.method} {response.request.url.path}"
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (where, name, response.headers)
    policy = csp(response)
    assert policy.get("default-src") == ["'none'"], (where, policy)
    assert policy.get("frame-ancestors") == ["'none'"], (where, policy)
    for directive in ("script-src", "style-src", "connect-src", "img-src"):
        assert policy.get(directive) == ["'self'"], (where, directive, policy)


async def test_the_page_and_the_api_send_strict_security_headers(server: ServerProcess) -> None:
    user = unique_user()
    async with httpx.AsyncClient(base_url=server.http) as http:
        responses = [
            await http.get(path)
            for path in (
                "/",
                "/index.html",
                "/app.js",
                "/app.css",
                "/missing.js",
                "/health/live",
                "/health/ready",
                "/metrics",
                "/api/threads",
                "/api/openapi.json",
            )
        ]
        headers = {"Authorization": f"Bearer {server.token(user)}"}
        responses.append(await http.get("/api/threads", headers=headers))
        responses.append(await http.get("/api/threads/x/events?after_seq=-1", headers=headers))
        responses.append(await http.head("/"))
        docs = await http.get("/api/docs")
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 200, 200, 200, 404, 200, 200, 200, 401, 200, 200, 422, 200]
    for response in responses:
        assert_strict(response)
    # Outside development the OpenAPI UI (which loads its assets from a CDN) is off.
    assert docs.status_code == 404
    assert_strict(docs)


def test_the_page_needs_nothing_its_policy_forbids() -> None:
    """No inline script, inline style, event-handler attribute or off-site URL in the page."""
    html = (STATIC / "index.html").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
    assert re.findall(r"<style\b|\sstyle=|\son[a-z]+=", html) == []
    for name in ("index.html", "app.js", "app.css"):
        text = (STATIC / name).read_text()
        assert re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text) == [], name
    script = (STATIC / "app.js").read_text()
    assert "eval(" not in script
    assert "new Function" not in script
    assert ".innerHTML" not in script


async def test_api_docs_are_served_in_development_only_under_their_own_policy(
    spawn: SpawnServer,
) -> None:
    server = spawn(ENVIRONMENT="development")
    async with httpx.AsyncClient(base_url=server.http) as http:
        docs = await http.get("/api/docs")
        page = await http.get("/")
    assert docs.status_code == 200
    policy = csp(docs)
    assert policy["default-src"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["script-src"] == ["'unsafe-inline'", "https://cdn.jsdelivr.net"]
    assert docs.headers["x-frame-options"] == "DENY"
    assert_strict(page)


async def test_the_page_runs_under_its_policy_in_chromium(server: ServerProcess) -> None:
    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():  # noqa: ASYNC240 - one stat before any traffic
        if os.environ.get("CI") == "true":
            pytest.fail("Debian's chromium is required under CI (.ci/run installs it)")
        pytest.skip("chromium not installed")
    from playwright.async_api import async_playwright, expect

    violations: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
        )
        try:
            page = await browser.new_page()
            page.on(
                "console",
                lambda m: violations.append(m.text) if "Content Security" in m.text else None,
            )
            await page.add_init_script(
                "document.addEventListener('securitypolicyviolation', e =>"
                " console.error('Content Security violation ' + e.violatedDirective))"
            )
            user = unique_user("csp")
            await page.goto(f"{server.http}/#token={make_token(user)}")
            await expect(page.locator("#status")).to_contain_text(f"Connected as {user}")
            await page.get_by_label("Message").fill("hello under a strict policy")
            await page.get_by_label("Message").press("Enter")
            await expect(page.locator(".run .terminal.completed")).to_be_visible()
            await expect(page.locator("#thread-list button")).to_have_count(1)  # fetch() worked
            background = await page.locator("body").evaluate(
                "b => getComputedStyle(b).backgroundColor"
            )
        finally:
            await browser.close()
    assert violations == []
    assert background != "rgba(0, 0, 0, 0)"  # the stylesheet applied


# --------------------------------------------------------------------------- row 10: open files


@pytest.fixture
def open_files_limit(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Start the next servers under `prlimit --nofile=SOFT:HARD` (as systemd or a shell would)."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) not installed")
    original = harness.parley_command

    def limit(soft: int, hard: int) -> None:
        monkeypatch.setattr(
            harness,
            "parley_command",
            lambda *args: ["prlimit", f"--nofile={soft}:{hard}", "--", *original(*args)],
        )

    return limit


async def test_startup_raises_the_soft_open_files_limit_to_the_hard_one(
    spawn: SpawnServer, open_files_limit: Any
) -> None:
    open_files_limit(256, 8192)
    server = spawn()
    async with httpx.AsyncClient(base_url=server.http) as http:
        metrics = (await http.get("/metrics")).text
    assert metric(metrics, "parley_open_files_limit") == 8192
    assert re.search(r"open_files.limit soft=8192 hard=8192 was=256", server.read_log())


async def test_near_the_open_files_limit_websockets_get_503_and_health_still_answers(
    spawn: SpawnServer, open_files_limit: Any
) -> None:
    open_files_limit(300, 300)  # a hard limit too, so the server cannot raise it
    server = spawn()
    assert "open_files.limit_low soft=300" in server.read_log()
    accepted: list[websockets.ClientConnection] = []
    refusals: list[int] = []
    async with (
        contextlib.AsyncExitStack() as stack,
        httpx.AsyncClient(base_url=server.http) as http,
    ):
        for _ in range(400):  # more than fit
            headers = {"Authorization": f"Bearer {server.token(unique_user())}"}
            try:
                ws = await stack.enter_async_context(
                    websockets.connect(server.ws_url, additional_headers=headers)
                )
            except InvalidStatus as exc:
                refusals.append(exc.response.status_code)
                continue
            assert json.loads(await ws.recv())["type"] == "system_message"
            accepted.append(ws)
        refused = len(refusals)
        assert refused > 0
        assert set(refusals) == {503}
        assert 100 < len(accepted) < 300 - 64
        # The reserve keeps the process answering: health, metrics, the API, runs.
        assert (await http.get("/health/live")).status_code == 200
        assert (await http.get("/health/ready")).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert metric(metrics, "parley_open_files_limit") == 300
        assert metric(metrics, "parley_websocket_refused_total") == refused
        assert metric(metrics, "parley_connections_open") == len(accepted)
        first = accepted[0]
        await first.send(json.dumps({"type": "user_message", "content": "still working?"}))
        while json.loads(await asyncio.wait_for(first.recv(), 20))["type"] != "agent_completed":
            pass
        for ws in accepted[-20:]:  # the last ones admitted work too
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await ws.recv())["type"] == "pong"
        # Connections are admitted again once some close.
        for ws in accepted[:50]:
            await ws.close()
        await asyncio.sleep(1.0)
        async with server.connect(unique_user()) as client:
            assert client.hello["type"] == "system_message"
    log = server.read_log()
    assert "Too many open files" not in log
    assert "Traceback" not in log
    assert log.count("open_files.websocket_refused") == 1  # one warning for the whole burst
