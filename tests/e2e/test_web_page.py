"""The chat page in a real headless Chromium (Debian's, driven by Playwright) against a real
Parley. The browser reaches Parley through a TCP proxy owned by the test, so the test can cut
the connection in the middle of a run, as a network blip or a server-side close would."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.conftest import SpawnServer
from tests.fakes.llm_server import FakeLLM, Text, ToolCall
from tests.harness import JWT_SECRET, CuttingProxy, make_token, trigger

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():  # noqa: ASYNC240 - one stat before any test traffic
        if os.environ.get("CI") == "true":
            pytest.fail("Debian's chromium is required under CI (.ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield launched
        await launched.close()


def token_until(user: str, exp: int) -> str:
    return jwt.encode({"sub": user, "exp": exp}, JWT_SECRET, "HS256")


async def send(page: Page, text: str) -> None:
    await page.get_by_label("Message").fill(text)
    await page.get_by_label("Message").press("Enter")


async def test_chat_page_shows_each_run_live_stops_and_survives_a_cut_connection(
    spawn: SpawnServer, fake_llm: FakeLLM, browser: Browser
) -> None:
    server = spawn()
    tool_run = fake_llm.script(
        trigger(),
        ToolCall([("calculator", {"expression": "12 * 12"})]),
        Text("Twelve twelves are 144.", chunk=4, delay_s=0.02),
    )
    slow_run = fake_llm.script(trigger(), Text("tick " * 200, chunk=5, delay_s=0.05))
    long_answer = " ".join(f"word{i}" for i in range(80))
    cut_run = fake_llm.script(trigger(), Text(long_answer, chunk=7, delay_s=0.04))

    async with CuttingProxy(server.port) as proxy:
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{proxy.port}/#token={make_token('web-user')}")
        await expect(page.locator("#status")).to_contain_text("Connected as web-user")
        await expect(page.locator("#sign-in")).to_be_hidden()
        assert "token" not in page.url  # the token does not stay in the address bar

        # 1. A run with a tool call: every kind of timeline entry appears.
        await send(page, f"What is 12 squared? {tool_run}")
        run = page.locator(".run").nth(0)
        await expect(run.locator(".user-message")).to_have_text(f"What is 12 squared? {tool_run}")
        await expect(run.locator(".entry.started")).to_have_text("assistant started")
        await expect(run.locator(".entry.thinking").first).to_contain_text("planning a reply")
        await expect(run.locator(".tool-arguments")).to_contain_text('"expression": "12 * 12"')
        await expect(run.locator(".tool-status.ok")).to_contain_text(re.compile(r"done in \d+ ms"))
        await expect(run.locator(".tool-result.ok")).to_contain_text('"result": 144')
        await expect(run.locator(".terminal.completed")).to_contain_text("tokens in")
        await expect(run.locator(".answer")).to_have_text("Twelve twelves are 144.")
        await expect(page.locator("#thread-list button")).to_have_count(1)

        # 2. Stop a run with the Stop button.
        await send(page, f"Count forever {slow_run}")
        stopped = page.locator(".run").nth(1)
        await expect(stopped.locator(".answer")).to_contain_text("tick")
        await page.get_by_role("button", name="Stop").click()
        await expect(stopped.locator(".terminal.cancelled")).to_have_text(
            "Cancelled (user_requested)"
        )
        await expect(page.get_by_role("button", name="Stop")).to_be_hidden()

        # 3. Cut the connection mid-run: the page reconnects, resumes and finishes the run.
        await send(page, f"Say many words {cut_run}")
        cut = page.locator(".run").nth(2)
        await expect(cut.locator(".answer")).to_contain_text("word3")
        proxy.cut()
        await expect(page.locator("#status")).to_contain_text("Connection lost")
        await expect(cut.locator(".terminal.completed")).to_be_visible(timeout=20000)
        await expect(cut.locator(".answer")).to_have_text(long_answer)
        seqs = [
            int(s)
            for s in await page.locator("[data-seq]").evaluate_all(
                "nodes => nodes.map(n => n.dataset.seq)"
            )
        ]
        assert seqs == sorted(set(seqs)), "a timeline line was duplicated or out of order"
        assert await cut.locator(".entry.started").count() == 1

        ARTIFACTS.mkdir(exist_ok=True)
        await page.locator(".run").nth(0).scroll_into_view_if_needed()
        await page.screenshot(path=str(ARTIFACTS / "web-finished-run.png"), full_page=True)

        # 4. The thread comes back after a reload, from the server's event log.
        await page.reload()
        await page.locator("#thread-list button").first.click()
        await expect(page.locator(".run")).to_have_count(3)
        await expect(page.locator(".run").nth(2).locator(".answer")).to_have_text(long_answer)


async def test_chat_page_fits_a_phone_and_works_from_the_keyboard(
    spawn: SpawnServer, browser: Browser
) -> None:
    server = spawn()
    page = await browser.new_page(viewport={"width": 375, "height": 740})
    await page.goto(server.http + "/")
    await page.get_by_label("Access token (JWT)").fill(make_token("phone-user"))
    await page.keyboard.press("Tab")  # from the token field to "Sign in"
    await expect(page.get_by_role("button", name="Sign in")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.locator("#status")).to_contain_text("Connected as phone-user")
    await send(page, "hello from a phone")
    await expect(page.locator(".terminal.completed")).to_be_visible()
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375
    await page.screenshot(path=str(ARTIFACTS / "web-phone.png"))
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_label("Access token (JWT)")).to_be_visible()


async def test_a_refused_token_sends_the_page_back_to_sign_in(
    spawn: SpawnServer, browser: Browser
) -> None:
    server = spawn()
    page = await browser.new_page()
    await page.goto(server.http + "/#token=" + make_token("x", ttl=-100))
    await expect(page.locator("#status")).to_contain_text("refused")
    await expect(page.get_by_label("Access token (JWT)")).to_be_visible()


async def test_the_page_asks_for_a_new_token_before_expiry_and_stays_connected(
    spawn: SpawnServer, browser: Browser
) -> None:
    server = spawn()
    user = f"renew-{uuid.uuid4().hex[:8]}"
    first_exp = int(time.time()) + 10
    page = await browser.new_page()
    await page.goto(server.http + "/#token=" + token_until(user, first_exp))
    await expect(page.locator("#status")).to_contain_text(f"Connected as {user}")
    # Asked half way through the token's life (the server would close at its exp).
    renew = page.get_by_label(re.compile("Your access token expires at"))
    await expect(renew).to_be_visible(timeout=10_000)
    # Another user's token is refused and the connection keeps its own.
    await renew.fill(make_token("someone-else"))
    await page.get_by_role("button", name="Renew token").click()
    await expect(page.locator("#renew-error")).to_contain_text("another user")
    await renew.fill(make_token(user))
    await page.get_by_role("button", name="Renew token").click()
    await expect(page.locator("#status")).to_contain_text("token renewed")
    await expect(page.locator("#renew")).to_be_hidden()
    # Past the first token's exp, the page is still connected and a run works.
    await asyncio.sleep(max(0.0, first_exp + 2 - time.time()))
    await expect(page.locator("#status")).to_contain_text("token renewed")
    await send(page, "still here?")
    await expect(page.locator(".terminal.completed")).to_be_visible()
    await expect(page.locator(".answer")).to_have_text("echo: still here?")


async def test_an_expired_token_sends_the_page_to_sign_in_and_it_goes_on_in_the_same_thread(
    spawn: SpawnServer, browser: Browser
) -> None:
    server = spawn()
    user = f"expire-{uuid.uuid4().hex[:8]}"
    page = await browser.new_page()
    await page.goto(server.http + "/#token=" + token_until(user, int(time.time()) + 6))
    await expect(page.locator("#status")).to_contain_text(f"Connected as {user}")
    await send(page, "remember me")
    await expect(page.locator(".answer")).to_have_text("echo: remember me")
    await expect(page.locator("#status")).to_contain_text(
        "Your token expired: paste a new one", timeout=15_000
    )
    await expect(page.get_by_label("Access token (JWT)")).to_be_visible()
    await page.get_by_label("Access token (JWT)").fill(make_token(user))
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#status")).to_contain_text(f"Connected as {user}")
    await send(page, "and go on")
    await expect(page.locator(".answer").nth(1)).to_have_text("echo: and go on")
    await expect(page.locator("#thread-list li")).to_have_count(1)
