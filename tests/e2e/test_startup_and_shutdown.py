"""Startup that fails fast and says where; `parley check`; truthful readiness; graceful shutdown.

Each startup test breaks exactly one dependency of a real `parley serve` and asserts: non-zero
exit, the phase named in the first line, the phase table, no secret printed, nothing served.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import SpawnServer, llm_env
from tests.fakes.llm_server import FakeLLM, Text
from tests.harness import base_env, free_port, parley_command, unique_user

PHASE_NAMES = ("settings", "database", "event_bus", "llm", "tools", "supervisor", "transport")


@dataclass
class Outcome:
    code: int
    stderr: str
    stdout: str
    port: int

    @property
    def first_line(self) -> str:
        return self.stderr.splitlines()[0] if self.stderr else ""


def run_parley(tmp_path: Path, *args: str, timeout: float = 60, **env: str) -> Outcome:
    port = free_port()
    full_env = base_env(tmp_path / "data", PORT=str(port), **env)
    for key in [k for k, v in full_env.items() if v == ""]:
        del full_env[key]
    done = subprocess.run(
        parley_command(*args),
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Outcome(done.returncode, done.stderr, done.stdout, port)


def port_is_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def assert_failed_in(outcome: Outcome, phase: str, *words: str) -> None:
    assert outcome.code != 0
    assert outcome.first_line.startswith(f"startup failed in phase {phase}: "), outcome.stderr
    for word in words:
        assert word in outcome.first_line, outcome.first_line
    for name in PHASE_NAMES:
        assert name in outcome.stderr
    assert "not reached" in outcome.stderr or phase == "transport"
    assert "Traceback" not in outcome.stderr
    assert port_is_closed(outcome.port)


def test_no_language_model_configured_fails_in_llm_with_how_to_configure(tmp_path: Path) -> None:
    outcome = run_parley(tmp_path, "serve", LLM_PROVIDER="")
    assert_failed_in(outcome, "llm", "no language model", "LLM_PROVIDER", "LLM_BASE_URL")


def test_production_without_secrets_fails_in_settings_and_prints_no_secret(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    outcome = run_parley(
        tmp_path,
        "serve",
        ENVIRONMENT="production",
        JWT_SECRET="",
        DATABASE_URL="",
        **{**llm_env(fake_llm), "LLM_API_KEY": "sk-super-secret-value"},
    )
    assert_failed_in(outcome, "settings", "DATABASE_URL", "JWT_SECRET or AUTH_SERVICE_URL")
    assert "sk-super-secret-value" not in outcome.stderr + outcome.stdout


def test_local_model_file_that_does_not_exist_fails_in_llm(tmp_path: Path) -> None:
    outcome = run_parley(
        tmp_path, "serve", LLM_PROVIDER="local", LLM_MODEL_PATH=str(tmp_path / "missing.gguf")
    )
    assert_failed_in(outcome, "llm", "LLM_MODEL_PATH", "missing.gguf")


def test_staging_never_falls_back_to_the_local_model(tmp_path: Path) -> None:
    outcome = run_parley(
        tmp_path,
        "serve",
        ENVIRONMENT="staging",
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/p.db",
        LLM_PROVIDER="",
    )
    assert_failed_in(outcome, "settings", "LLM_PROVIDER is required in staging")


def test_unknown_provider_fails_in_settings(tmp_path: Path, fake_llm: FakeLLM) -> None:
    outcome = run_parley(tmp_path, "serve", **{**llm_env(fake_llm), "LLM_PROVIDER": "skynet"})
    assert outcome.code != 0
    assert outcome.first_line.startswith("startup failed in phase settings: LLM_PROVIDER")


def test_malformed_number_fails_in_settings(tmp_path: Path, fake_llm: FakeLLM) -> None:
    outcome = run_parley(tmp_path, "serve", **llm_env(fake_llm), RUN_TIMEOUT_S="soon")
    assert outcome.code != 0
    assert outcome.first_line.startswith("startup failed in phase settings: RUN_TIMEOUT_S")


def test_unwritable_sqlite_path_fails_in_database_at_once(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    started = time.monotonic()
    outcome = run_parley(
        tmp_path,
        "serve",
        **llm_env(fake_llm),
        DATABASE_URL=f"sqlite+aiosqlite:///{blocker}/sub/parley.db",
    )
    assert_failed_in(outcome, "database", "cannot be created")
    assert time.monotonic() - started < 10  # a configuration error is not retried


def test_unreachable_database_is_retried_then_fails_in_database_without_the_password(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    url = f"postgresql+asyncpg://parley:hunter2-password@127.0.0.1:{free_port()}/parley"
    outcome = run_parley(
        tmp_path, "serve", **llm_env(fake_llm), DATABASE_URL=url, STARTUP_TIMEOUT_S="3"
    )
    assert_failed_in(outcome, "database")
    assert "attempts" in outcome.stderr
    assert "hunter2-password" not in outcome.stderr + outcome.stdout


def test_unreachable_redis_fails_in_event_bus(tmp_path: Path, fake_llm: FakeLLM) -> None:
    outcome = run_parley(
        tmp_path,
        "serve",
        **llm_env(fake_llm),
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        STARTUP_TIMEOUT_S="2",
    )
    assert_failed_in(outcome, "event_bus")


def test_tool_registry_that_cannot_be_built_fails_in_tools(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "clash.py").write_text(
        "async def calculator(ctx, expression: str) -> str:\n    return 'shadowed'\n"
        "TOOLS = [calculator]\n"
    )
    outcome = run_parley(
        tmp_path, "serve", **llm_env(fake_llm), EXTRA_TOOLS="clash:TOOLS", PYTHONPATH=str(plugins)
    )
    assert_failed_in(outcome, "tools", "tool registry", "share a name")


def test_supervisor_that_cannot_be_built_fails_in_supervisor(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken_agents.py").write_text(
        "from parley.agents import AgentSpec\n"
        "AGENTS = [AgentSpec(name='assistant', instructions='x', tools=['teleport'])]\n"
    )
    outcome = run_parley(
        tmp_path,
        "serve",
        **llm_env(fake_llm),
        AGENTS="broken_agents:AGENTS",
        PYTHONPATH=str(plugins),
    )
    assert_failed_in(outcome, "supervisor", "teleport")


def test_agents_module_that_raises_fails_in_supervisor(tmp_path: Path, fake_llm: FakeLLM) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "exploding.py").write_text("raise RuntimeError('factory exploded')\n")
    outcome = run_parley(
        tmp_path, "serve", **llm_env(fake_llm), AGENTS="exploding:AGENTS", PYTHONPATH=str(plugins)
    )
    assert_failed_in(outcome, "supervisor", "factory exploded")


def test_unreachable_auth_service_fails_in_transport(tmp_path: Path, fake_llm: FakeLLM) -> None:
    outcome = run_parley(
        tmp_path,
        "serve",
        **llm_env(fake_llm),
        JWT_SECRET="",
        AUTH_SERVICE_URL=f"http://127.0.0.1:{free_port()}",
        STARTUP_TIMEOUT_S="2",
    )
    assert_failed_in(outcome, "transport")


# ---------------------------------------------------------------------------- parley check


def test_check_runs_every_phase_and_the_llm_probe(tmp_path: Path, fake_llm: FakeLLM) -> None:
    outcome = run_parley(tmp_path, "check", "--llm-probe", **llm_env(fake_llm))
    assert outcome.code == 0, outcome.stderr
    for name in (*PHASE_NAMES, "llm_probe"):
        line = next(line for line in outcome.stdout.splitlines() if f" {name} " in line)
        assert " ok " in line, line
    assert any("/chat/completions" for _ in fake_llm.requests)


def test_check_fails_when_the_llm_probe_fails(tmp_path: Path, fake_llm: FakeLLM) -> None:
    env = {**llm_env(fake_llm), "LLM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"}
    outcome = run_parley(tmp_path, "check", "--llm-probe", **env)
    assert outcome.code == 1
    assert outcome.first_line.startswith("check failed in phase llm_probe")


def test_check_without_probe_does_not_call_the_llm(tmp_path: Path, fake_llm: FakeLLM) -> None:
    env = {**llm_env(fake_llm), "LLM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"}
    outcome = run_parley(tmp_path, "check", **env)
    assert outcome.code == 0, outcome.stderr


def test_token_and_migrate_commands(tmp_path: Path) -> None:
    token = run_parley(tmp_path, "token", "--user", "ada", "--ttl", "60")
    assert token.code == 0
    assert token.stdout.count(".") == 2
    migrated = run_parley(tmp_path, "migrate")
    assert migrated.code == 0
    assert "revision 0002" in migrated.stdout


# ---------------------------------------------------------------------------- readiness


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of the test's own, so the test can stop and start it."""

    bin_dir: Path
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), *args]
        subprocess.run(_as_postgres(command), check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-w", "-l", str(self.data / "log"), "-o", options, "start")

    def stop(self) -> None:
        self._ctl("-w", "-m", "immediate", "stop")


def _as_postgres(command: list[str]) -> list[str]:
    if os.getuid() != 0:
        return command
    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(command)]


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    bin_dir = os.environ.get("PARLEY_TEST_PG_BIN")
    if not bin_dir:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL binaries are required under CI")
        pytest.skip("PostgreSQL binaries not found (PARLEY_TEST_PG_BIN unset)")
    data = Path(f"/tmp/parley-private-pg-{uuid.uuid4().hex[:8]}")
    data.mkdir(mode=0o700)
    if os.getuid() == 0:
        shutil.chown(data, pwd.getpwnam("postgres").pw_uid)
    initdb = [str(Path(bin_dir) / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
    subprocess.run(_as_postgres(initdb), check=True, capture_output=True, timeout=120)
    server = PrivatePostgres(Path(bin_dir), data, free_port())
    server.start()
    yield server
    subprocess.run(
        _as_postgres([str(Path(bin_dir) / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
        capture_output=True,
        timeout=60,
    )
    shutil.rmtree(data, ignore_errors=True)


async def wait_for_readiness(base: str, status: int, timeout: float = 15.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base) as http:
        while True:
            response = await http.get("/health/ready")
            if response.status_code == status:
                body: dict[str, object] = response.json()
                return body
            assert time.monotonic() < deadline, response.text
            await asyncio.sleep(0.2)


@pytest.mark.postgres
async def test_readiness_turns_503_when_the_database_goes_away_and_back_when_it_returns(
    spawn: SpawnServer, private_postgres: PrivatePostgres
) -> None:
    server = spawn(DATABASE_URL=private_postgres.url)
    private_postgres.stop()
    down = await wait_for_readiness(server.http, 503)
    assert down["status"] == "not_ready"
    assert down["components"]["database"]["status"] == "down"  # type: ignore[index]
    async with httpx.AsyncClient(base_url=server.http) as http:
        assert (await http.get("/health/live")).status_code == 200
    private_postgres.start()
    up = await wait_for_readiness(server.http, 200)
    assert up["status"] == "ready"
    async with server.connect(unique_user()) as client:
        accepted = await client.ask("are you back?")
        events = await client.run_events(accepted["run_id"])
    assert events[-1]["type"] == "agent_completed"


# ---------------------------------------------------------------------------- shutdown


async def test_sigterm_cancels_a_run_past_the_grace_period_and_closes_with_1001(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(SHUTDOWN_GRACE_S="3")
    t = fake_llm.script(f"T{uuid.uuid4().hex[:10]}", Text("slow " * 100, chunk=5, delay_s=0.1))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"take your time {t}")
        await client.recv_type("agent_message_delta")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        await wait_for_readiness(server.http, 503, timeout=3)
        refused = await client.ask("one more?")
        events = await client.run_events(accepted["run_id"])
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
    assert refused["type"] == "error"
    assert refused["code"] == "unavailable"
    assert events[-1]["type"] == "agent_cancelled"
    assert events[-1]["reason"] == "server_shutdown"
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001
    assert server.stop() == 0


async def test_sigterm_lets_a_short_run_finish_within_the_grace_period(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(SHUTDOWN_GRACE_S="15")
    t = fake_llm.script(f"T{uuid.uuid4().hex[:10]}", Text("almost done " * 5, delay_s=0.05))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"finish please {t}")
        await client.recv_type("agent_started")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        events = await client.run_events(accepted["run_id"])
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
    assert events[-1]["type"] == "agent_completed"
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001
    assert server.stop() == 0
    assert "shutdown.drained" in server.output


async def test_runs_orphaned_by_a_killed_process_are_ended_at_the_next_start(
    spawn: SpawnServer, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    data = tmp_path / "shared-data"
    first = spawn(data_dir=data)
    user = unique_user()
    t = fake_llm.script(f"T{uuid.uuid4().hex[:10]}", Text("never finishes " * 50, delay_s=0.2))
    async with first.connect(user) as client:
        accepted = await client.ask(f"start {t}")
        await client.recv_type("agent_message_delta")
    first.stop(signal.SIGKILL)
    second = spawn(data_dir=data)
    async with second.connect(user) as client:
        await client.send({"type": "resume", "thread_id": accepted["thread_id"], "after_seq": 0})
        frames = []
        while (frame := await client.recv())["type"] != "resume_complete":
            frames.append(frame)
    assert frames[-1]["type"] == "agent_error"
    assert frames[-1]["code"] == "interrupted"
    assert frames[-1]["retryable"] is True
    assert (
        sum(
            1
            for f in frames
            if f["type"].startswith("agent_")
            and f["type"] in {"agent_completed", "agent_error", "agent_cancelled"}
        )
        == 1
    )
