"""`parley chat` in a real pseudo-terminal (pexpect) against a real Parley."""

from __future__ import annotations

import asyncio
import io
import re
import sys
import uuid

import pexpect

from tests.conftest import SpawnServer
from tests.fakes.llm_server import FakeLLM, Text, ToolCall
from tests.harness import CuttingProxy, ServerProcess, make_token


def chat(url: str, user: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "parley", "chat", "--url", url, "--token", make_token(user)],
        env={"TERM": "xterm", "COLUMNS": "120", "LINES": "40", "PATH": "/usr/bin:/bin"},
        encoding="utf-8",
        timeout=20,
        dimensions=(40, 120),
    )
    child.logfile_read = io.StringIO()  # the whole transcript, for checks after the fact
    child.expect(f"connected as {user}")
    child.expect("you> ")
    return child


async def expect(child: pexpect.spawn, pattern: str) -> None:
    # pexpect blocks: run it in a thread so the test's event loop (the proxy) keeps going.
    await asyncio.to_thread(child.expect, pattern)


async def test_chat_shows_tools_and_the_streamed_answer_and_ctrl_c_stops_then_quits(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn()
    tool = fake_llm.script(
        f"T{uuid.uuid4().hex[:8]}",
        ToolCall([("calculator", {"expression": "12 * 12"})]),
        Text("The answer is 144.", chunk=3, delay_s=0.02),
    )
    slow = fake_llm.script(f"T{uuid.uuid4().hex[:8]}", Text("tick " * 300, chunk=5, delay_s=0.05))
    child = chat(server.ws_url, "term-user")

    child.sendline(f"what is 12 squared? {tool}")
    await expect(child, "calculator")
    await expect(child, '"result": 144')
    await expect(child, "The answer is 144.")
    await expect(child, "completed")
    await expect(child, "you> ")

    child.sendline(f"count forever {slow}")
    await expect(child, "tick")
    child.sendintr()
    await expect(child, "stopping the run")
    await expect(child, "cancelled")
    await expect(child, "user_requested")
    await expect(child, "you> ")
    child.sendintr()  # at the prompt: quit
    await expect(child, pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


async def test_chat_reconnects_and_resumes_without_losing_or_repeating_text(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn()
    words = " ".join(f"w{i}" for i in range(60)) + " THE-END"
    long_run = fake_llm.script(f"T{uuid.uuid4().hex[:8]}", Text(words, chunk=6, delay_s=0.04))
    async with CuttingProxy(server.port) as proxy:
        child = await asyncio.to_thread(chat, f"ws://127.0.0.1:{proxy.port}/ws", "cut-user")
        child.sendline(f"talk {long_run}")
        await expect(child, "w5")
        proxy.cut()
        await expect(child, "reconnecting")
        await expect(child, "completed")
        child.sendline("/quit")
        await expect(child, pexpect.EOF)
    transcript = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.logfile_read.getvalue())
    for word in words.split():
        found = len(re.findall(rf"(?<![\w-]){re.escape(word)}(?![\w-])", transcript))
        assert found == 1, f"{word!r} shown {found} times"


async def test_chat_reconnects_after_the_server_restarts(spawn: SpawnServer) -> None:
    server = spawn()
    child = chat(server.ws_url, "restart-user")
    assert server.stop() == 0  # a clean shutdown: the client gets close 1001
    await expect(child, "connection lost")
    again = ServerProcess(server.env, server.port).start()
    try:
        await expect(child, "connected as restart-user")
        child.sendline("still there?")
        await expect(child, "echo: still there?")
        await expect(child, "completed")
    finally:
        again.stop()
        child.terminate(force=True)
