"""The bundled local model's process is supervised: killed, it is logged, restarted, and answers
again; runs during the outage end at once with `llm_unavailable`."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SpawnServer
from tests.e2e.test_local_model import BUNDLED_MODEL
from tests.harness import ServerProcess, unique_user

pytestmark = pytest.mark.local_model


async def llm_readiness(server: ServerProcess) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.http, timeout=5) as http:
        response = await http.get("/health/ready")
    return response.status_code, response.json()["components"]["llm"]


async def wait_for(server: ServerProcess, status: int, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        code, llm = await llm_readiness(server)
        if code == status:
            return llm
        assert time.monotonic() < deadline, f"readiness still {code} after {within}s: {llm}"
        await asyncio.sleep(0.1)


@pytest.mark.timeout(300)  # a loaded 2-core machine generates a few tokens a second
async def test_killed_local_model_is_restarted_and_the_next_run_is_answered(
    spawn: SpawnServer,
) -> None:
    server = spawn(**BUNDLED_MODEL, LLM_MAX_TOKENS="8", STARTUP_TIMEOUT_S="90")
    code, llm = await llm_readiness(server)
    assert code == 200
    pid = llm["pid"]
    cmdline = await asyncio.to_thread(Path(f"/proc/{pid}/cmdline").read_bytes)
    assert b"parley.local_model_server" in cmdline  # the model process, not Parley

    os.kill(pid, signal.SIGKILL)
    down = await wait_for(server, 503, within=5)
    assert down["status"] == "down"
    assert "killed by signal SIGKILL" in down["reason"]
    async with server.connect(unique_user()) as client:
        accepted = await client.ask("Is anyone there?")
        # Far below RUN_TIMEOUT_S (120 s): the run is refused, it does not wait for the restart.
        events = await client.run_events(accepted["run_id"], timeout=30)
    # The restart waits a second, then loads the model and checks it answers: the run sent in
    # that window ends with the process's exit as its reason, retryable, never a hang.
    assert events[-1]["type"] == "agent_error", events[-1]
    assert events[-1]["code"] == "llm_unavailable"
    assert "killed by signal SIGKILL" in events[-1]["message"]
    assert events[-1]["retryable"] is True

    back = await wait_for(server, 200, within=120)
    assert back["pid"] != pid
    async with server.connect(unique_user()) as client:
        accepted = await client.ask("Name one colour of the sky.")
        events = await client.run_events(accepted["run_id"], timeout=90)
    assert events[-1]["type"] == "agent_completed", events[-1]
    assert events[-1]["content"].strip()
    log = server.read_log()
    assert "local_model.exited" in log
    assert "killed by signal SIGKILL" in log
    assert "log_tail=" in log
    assert "local_model.restarted" in log
