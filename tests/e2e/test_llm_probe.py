"""Staging verifies the language model before it is ready, and readiness keeps verifying it.

Each test runs a real `parley serve` against a scripted OpenAI-compatible server of its own
(never the shared one: these tests stop it, or make it refuse keys), or against a port that
refuses connections.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SpawnServer
from tests.fakes.llm_server import FakeLLM
from tests.harness import ServerProcess, base_env, parley_command, refusing_port

KEY = "sk-right-" + "k" * 24
WRONG_KEY = "sk-wrong-secret-" + "w" * 24


@pytest.fixture
def provider() -> Iterator[FakeLLM]:
    fake = FakeLLM(api_key=KEY)
    fake.start()
    yield fake
    fake.stop()


def staging_env(tmp_path: Path, base_url: str, **extra: str) -> dict[str, str]:
    return {
        "ENVIRONMENT": "staging",
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/parley.db",
        "LLM_PROVIDER": "openai",
        "LLM_MODEL": "fake-model",
        "LLM_BASE_URL": base_url,
        "LLM_API_KEY": KEY,
        "LLM_MAX_RETRIES": "0",
        "LOG_FORMAT": "console",
        **extra,
    }


def serve_until_exit(tmp_path: Path, env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """`parley serve` that is expected to fail startup: its exit code and all it printed.
    On port 0 (the kernel picks a free one, should it get that far): no port to race for."""
    # A wide terminal, so the startup table does not wrap the details the tests read in it.
    full = base_env(tmp_path / "data", PORT="0", COLUMNS="250", **env)
    done = subprocess.run(
        parley_command("serve"),
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stderr + done.stdout


async def readiness(server: ServerProcess) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.http, timeout=5) as http:
        response = await http.get("/health/ready")
    return response.status_code, response.json()


async def wait_for_readiness(server: ServerProcess, status: int, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        code, body = await readiness(server)
        if code == status:
            return body
        assert time.monotonic() < deadline, f"readiness still {code} after {within}s: {body}"
        await asyncio.sleep(0.2)


def test_unreachable_provider_is_retried_then_fails_startup_in_llm_naming_the_endpoint(
    tmp_path: Path,
) -> None:
    with refusing_port() as port:
        started = time.monotonic()
        code, output = serve_until_exit(
            tmp_path,
            staging_env(tmp_path, f"http://127.0.0.1:{port}/v1", STARTUP_TIMEOUT_S="3"),
        )
        elapsed = time.monotonic() - started
    first = output.splitlines()[0]
    assert code == 1
    assert first.startswith("startup failed in phase llm: not ready within STARTUP_TIMEOUT_S"), (
        output
    )
    assert f"http://127.0.0.1:{port}/v1 is unreachable" in first
    assert re.search(r"after \d+ attempts", output), output  # retried, not failed at once
    assert elapsed >= 2.5
    assert KEY not in output


def test_refused_api_key_fails_startup_at_once_without_printing_the_key(
    tmp_path: Path, provider: FakeLLM
) -> None:
    code, output = serve_until_exit(
        tmp_path,
        staging_env(tmp_path, provider.base_url, LLM_API_KEY=WRONG_KEY, STARTUP_TIMEOUT_S="20"),
    )
    first = output.splitlines()[0]
    assert code == 1
    assert first.startswith("startup failed in phase llm: "), output
    assert "refused the API key (HTTP 401)" in first
    assert "STARTUP_TIMEOUT_S" not in first  # it did not wait out the deadline
    assert "attempts" not in output  # configuration: not retried
    assert provider.refused == 1  # one probe request, never a second
    assert WRONG_KEY not in output
    assert WRONG_KEY[:12] not in output  # not even the provider's partial echo of it


def test_unknown_model_fails_startup_at_once(tmp_path: Path) -> None:
    fake = FakeLLM(models=["another-model"])
    fake.start()
    try:
        code, output = serve_until_exit(
            tmp_path, staging_env(tmp_path, fake.base_url, STARTUP_TIMEOUT_S="20")
        )
    finally:
        fake.stop()
    first = output.splitlines()[0]
    assert code == 1
    assert first.startswith("startup failed in phase llm: "), output
    assert "the model 'fake-model' is not known" in first
    assert "attempts" not in output


async def test_model_missing_from_the_listing_is_confirmed_by_a_one_token_completion(
    spawn: SpawnServer, tmp_path: Path
) -> None:
    fake = FakeLLM(lists_models=False)
    fake.start()
    try:
        server = spawn(**staging_env(tmp_path, fake.base_url))
        code, body = await readiness(server)
    finally:
        fake.stop()
    assert code == 200, body
    probes = [r for r in fake.requests if r.get("max_tokens") == 1]
    assert len(probes) == 1
    assert "probe ok (answered)" in server.read_log()


async def test_listed_model_is_probed_without_any_completion(
    spawn: SpawnServer, provider: FakeLLM, tmp_path: Path
) -> None:
    server = spawn(**staging_env(tmp_path, provider.base_url))
    assert (await readiness(server))[0] == 200
    assert provider.requests == []  # GET /models was enough: no tokens spent
    assert "probe ok (listed)" in server.read_log()


async def test_provider_that_stops_turns_readiness_503_and_back_to_200_when_it_returns(
    spawn: SpawnServer, provider: FakeLLM, tmp_path: Path
) -> None:
    server = spawn(**staging_env(tmp_path, provider.base_url, LLM_PROBE_INTERVAL_S="1"))
    assert (await readiness(server))[0] == 200
    provider.stop()
    # Due within the interval (1 s, plus jitter) and the readiness cache (1 s); the bound leaves
    # room for a loaded machine and is far below the 30 s allowed.
    body = await wait_for_readiness(server, 503, within=10)
    llm = body["components"]["llm"]
    assert llm["status"] == "down"
    assert llm["probe"] == "failed"
    assert f"{provider.base_url} is unreachable" in llm["reason"]
    assert llm["last_success"] is not None
    assert (
        await server.metric('parley_llm_probe_failures_total{kind="unreachable"}', absent=0.0) >= 1
    )
    await asyncio.sleep(2.5)  # more failed probes: the state change is still logged once
    provider.start()
    body = await wait_for_readiness(server, 200, within=10)
    assert body["components"]["llm"]["probe"] == "ok"
    log = server.read_log()
    assert log.count("llm.probe_failed") == 1
    assert log.count("llm.probe_recovered") == 1
    assert await server.metric("parley_llm_probe_seconds_count", absent=0.0) >= 3


async def test_readiness_never_waits_on_a_stalled_provider_nor_probes_more_often_than_its_interval(
    spawn: SpawnServer, provider: FakeLLM, tmp_path: Path
) -> None:
    server = spawn(**staging_env(tmp_path, provider.base_url, LLM_PROBE_INTERVAL_S="2"))
    provider.stop()
    # A provider that accepts connections and never answers: the probe hangs until its timeout.
    with socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stalled.bind(("127.0.0.1", provider.port))
        stalled.listen(64)
        started = time.monotonic()
        slowest = 0.0
        async with httpx.AsyncClient(base_url=server.http, timeout=5) as http:
            while time.monotonic() - started < 5:
                before = time.monotonic()
                await http.get("/health/ready")
                slowest = max(slowest, time.monotonic() - before)
        probes = await server.metric("parley_llm_probe_seconds_count", absent=0.0)
    assert slowest < 1.0
    # 5 s of readiness traffic with a 2 s interval: at most two probes ended (none if stalled).
    assert probes <= 2


async def test_startup_probe_off_starts_without_contacting_the_provider_and_says_so(
    spawn: SpawnServer, tmp_path: Path
) -> None:
    with refusing_port() as port:
        server = spawn(
            **staging_env(
                tmp_path,
                f"http://127.0.0.1:{port}/v1",
                LLM_STARTUP_PROBE="off",
                LLM_PROBE_INTERVAL_S="0",
            )
        )
        code, body = await readiness(server)
    assert code == 200, body
    assert body["components"]["llm"]["probe"] == "off"
    log = server.read_log()
    # The phase table printed on startup: the llm phase passed, and says it was not probed.
    assert re.search(
        r"^│ llm +│ ok +│ +\d+ │ startup probe off \(LLM_STARTUP_PROBE\) +│$", log, re.MULTILINE
    ), log
