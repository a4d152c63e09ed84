"""`parley chat` in a real pseudo-terminal (pexpect) against a real Parley."""

from __future__ import annotations

import asyncio
import io
import re
import sys
import time
import uuid
from pathlib import Path

import pexpect

from tests.conftest import SpawnServer
from tests.fakes.llm_server import FakeLLM, Text, ToolCall
from tests.harness import CuttingProxy, ServerProcess, make_token, unique_user


def chat(url: str, user: str, *credentials: str) -> pexpect.spawn:
    """`parley chat` as `user`: with a fresh hour-long `--token`, or with `credentials`."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "parley", "chat", "--url", url, *(credentials or ["--token", make_token(user)])],
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


async def test_chat_says_the_token_expired_and_exits_when_it_cannot_renew_it(
    server: ServerProcess,
) -> None:
    user = unique_user("short")
    # Long enough to connect on a busy machine; then it expires at the prompt.
    child = chat(server.ws_url, user, "--token", make_token(user, ttl=15))
    await asyncio.to_thread(child.expect, "your token expired; get a new one", timeout=40)
    await expect(child, pexpect.EOF)
    child.close()
    assert child.exitstatus == 1


async def test_chat_renews_its_token_with_token_command_and_stays_connected(
    server: ServerProcess, tmp_path: Path
) -> None:
    user = unique_user("renewing")
    # A token command that prints the next of these tokens each time it runs (a real one
    # would ask an auth service); the first expires 20 s from now, the next ones much later.
    now = int(time.time())
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{make_token(user, ttl=ttl)}\n" for ttl in (20, 600, 1200)))
    command = f"head -n 1 {tokens}; sed -i 1d {tokens}"
    child = chat(server.ws_url, user, "--token-command", command)
    # Past the first token's exp, with the connection kept throughout.
    await asyncio.sleep(max(0, now + 23 - time.time()))
    child.sendline("still connected?")
    await expect(child, "echo: still connected?")
    await expect(child, "completed")
    child.sendline("/quit")
    await expect(child, pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert tokens.read_text().count("\n") == 1, "the command did not run twice"
    transcript = child.logfile_read.getvalue()
    assert "expired" not in transcript, transcript
    assert "reconnecting" not in transcript, transcript
