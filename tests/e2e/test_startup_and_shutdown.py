"""Startup that fails fast and says where; `parley check`; truthful readiness; graceful shutdown.

Each startup test breaks exactly one dependency of a real `parley serve` and asserts: non-zero
exit, the phase named in the first line, the phase table, no secret printed, nothing served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.conftest import SpawnServer, llm_env
from tests.e2e.test_transport import jwks_server
from tests.fakes.llm_server import FakeLLM, Text
from tests.harness import base_env, make_token, metric, parley_command, refusing_port, unique_user

PHASE_NAMES = ("settings", "database", "event_bus", "llm", "tools", "supervisor", "transport")


@dataclass
class Outcome:
    code: int
    stderr: str
    stdout: str

    @property
    def first_line(self) -> str:
        return self.stderr.splitlines()[0] if self.stderr else ""


def run_parley(tmp_path: Path, *args: str, timeout: float = 60, **env: str) -> Outcome:
    # Port 0: were startup to pass by mistake, the server would take a port no one else has.
    full_env = base_env(tmp_path / "data", PORT="0", **env)
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
    return Outcome(done.returncode, done.stderr, done.stdout)


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on: its sockets in LISTEN state, from /proc."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def assert_failed_in(outcome: Outcome, phase: str, *words: str) -> None:
    assert outcome.code != 0
    assert outcome.first_line.startswith(f"startup failed in phase {phase}: "), outcome.stderr
    for word in words:
        assert word in outcome.first_line, outcome.first_line
    for name in PHASE_NAMES:
        assert name in outcome.stderr
    assert "not reached" in outcome.stderr or phase == "transport"
    assert "Traceback" not in outcome.stderr


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


@pytest.mark.parametrize("published", [{"keys": "not a list"}, {"no_keys": []}])
def test_a_malformed_jwks_fails_startup_in_transport_with_one_line_naming_it(
    tmp_path: Path, fake_llm: FakeLLM, published: dict[str, object]
) -> None:
    with jwks_server(published) as auth_url:
        outcome = run_parley(
            tmp_path, "serve", JWT_SECRET="", AUTH_SERVICE_URL=auth_url, **llm_env(fake_llm)
        )
    assert_failed_in(outcome, "transport", "JWKS is malformed")


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
        STARTUP_TIMEOUT_S="60",
    )
    assert_failed_in(outcome, "database", "cannot be created")
    # A configuration error is not retried until STARTUP_TIMEOUT_S ("not never": no speed bound).
    assert time.monotonic() - started < 40


def test_unreachable_database_is_retried_then_fails_in_database_without_the_password(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    with refusing_port() as port:
        url = f"postgresql+asyncpg://parley:hunter2-password@127.0.0.1:{port}/parley"
        outcome = run_parley(
            tmp_path, "serve", **llm_env(fake_llm), DATABASE_URL=url, STARTUP_TIMEOUT_S="3"
        )
    assert_failed_in(outcome, "database")
    assert "attempts" in outcome.stderr
    assert "hunter2-password" not in outcome.stderr + outcome.stdout


def test_unreachable_redis_fails_in_event_bus(tmp_path: Path, fake_llm: FakeLLM) -> None:
    with refusing_port() as port:
        outcome = run_parley(
            tmp_path,
            "serve",
            **llm_env(fake_llm),
            REDIS_URL=f"redis://127.0.0.1:{port}/0",
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
    with refusing_port() as port:
        outcome = run_parley(
            tmp_path,
            "serve",
            **llm_env(fake_llm),
            JWT_SECRET="",
            AUTH_SERVICE_URL=f"http://127.0.0.1:{port}",
            STARTUP_TIMEOUT_S="2",
        )
    assert_failed_in(outcome, "transport")


# ---------------------------------------------------------------------------- parley check


def test_check_runs_every_phase_and_the_llm_probe(tmp_path: Path, private_llm: FakeLLM) -> None:
    outcome = run_parley(tmp_path, "check", "--llm-probe", **llm_env(private_llm))
    assert outcome.code == 0, outcome.stderr
    for name in (*PHASE_NAMES, "llm_probe"):
        line = next(line for line in outcome.stdout.splitlines() if f" {name} " in line)
        assert " ok " in line, line
    # The probe is a real completion, answered by this test's own fake (which echoes it).
    probes = [r for r in private_llm.requests if "ready" in json.dumps(r.get("messages"))]
    assert len(probes) == 1, private_llm.requests
    probe_line = next(line for line in outcome.stdout.splitlines() if " llm_probe " in line)
    assert "echo:" in probe_line, probe_line


def test_check_fails_when_the_llm_probe_fails(tmp_path: Path, fake_llm: FakeLLM) -> None:
    with refusing_port() as port:
        env = {**llm_env(fake_llm), "LLM_BASE_URL": f"http://127.0.0.1:{port}/v1"}
        outcome = run_parley(tmp_path, "check", "--llm-probe", **env)
    assert outcome.code == 1
    assert outcome.first_line.startswith("check failed in phase llm_probe")


def test_check_without_probe_does_not_call_the_llm(tmp_path: Path, fake_llm: FakeLLM) -> None:
    with refusing_port() as port:
        env = {**llm_env(fake_llm), "LLM_BASE_URL": f"http://127.0.0.1:{port}/v1"}
        outcome = run_parley(tmp_path, "check", **env)
    assert outcome.code == 0, outcome.stderr


def test_token_and_migrate_commands(tmp_path: Path) -> None:
    token = run_parley(tmp_path, "token", "--user", "ada", "--ttl", "60")
    assert token.code == 0
    assert token.stdout.count(".") == 2
    migrated = run_parley(tmp_path, "migrate")
    assert migrated.code == 0
    assert f"revision {_newest_revision()}" in migrated.stdout


def _newest_revision() -> str:
    """The head of the migrations that ship with Parley (what `migrate` must reach)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", "parley.store:migrations")
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


@pytest.mark.parametrize(
    "args", [("frobnicate",), ("serve", "--no-such-option"), ("token",), ("serve", "--port", "x")]
)
def test_bad_command_line_usage_exits_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    outcome = run_parley(tmp_path, *args)
    assert outcome.code == 2, outcome.stderr
    assert "Usage:" in outcome.stderr + outcome.stdout


async def test_a_failing_startup_never_listens_while_it_retries(
    spawn: SpawnServer, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    # The detector sees a serving process's port (so it can see one where none should be).
    serving = spawn()
    assert serving.proc is not None
    assert listening_ports(serving.proc.pid) == {serving.port}
    with refusing_port() as port:
        env = base_env(
            tmp_path / "data",
            **llm_env(fake_llm),
            PORT="0",
            DATABASE_URL=f"postgresql+asyncpg://parley@127.0.0.1:{port}/parley",
            STARTUP_TIMEOUT_S="4",
        )
        failing = await asyncio.create_subprocess_exec(
            *parley_command("serve"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        samples: list[set[int]] = []
        try:
            while failing.returncode is None:
                samples.append(listening_ports(failing.pid))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(failing.wait(), 0.1)
        finally:
            if failing.returncode is None:
                failing.kill()
            await failing.wait()
    assert failing.returncode == 1
    assert len(samples) >= 10, "the process was not watched while it retried"
    assert not set().union(*samples), "a port was open while startup was failing"


# ---------------------------------------------------------------------------- readiness


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of the test's own, so the test can stop and start it."""

    bin_dir: Path
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@/postgres?host={self.data}&port={self.port}"

    def _ctl(self, *args: str) -> None:
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), *args]
        subprocess.run(_as_postgres(command), check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        # A Unix socket in its own directory only: no TCP port to race other processes for.
        options = f"-p {self.port} -k {self.data} -c listen_addresses='' -c fsync=off"
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
    server = PrivatePostgres(Path(bin_dir), data, 5432)
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
        signalled = len(client.frames)
        await wait_for_readiness(server.http, 503, timeout=3)
        refused = await client.ask("one more?")
        events = await client.run_events(accepted["run_id"])
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
    # The run went on streaming during the grace period, and only then was cancelled.
    after = [f["type"] for f in client.frames[signalled:] if f.get("run_id") == accepted["run_id"]]
    assert after.count("agent_message_delta") >= 3, after
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


async def _connect_during_drain(url: str) -> tuple[list[dict[str, object]], int | None]:
    """Connect as a new user; the frames received until the server closed, and its code."""
    headers = {"Authorization": f"Bearer {make_token(unique_user())}"}
    frames = []
    async with websockets.connect(url, additional_headers=headers) as ws:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
    return frames, ws.close_code


async def test_a_drain_refuses_new_connections_and_a_second_signal_skips_the_grace_wait(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    grace_s = 100
    server = spawn(SHUTDOWN_GRACE_S=str(grace_s))
    assert server.proc is not None
    t = fake_llm.script(f"T{uuid.uuid4().hex[:10]}", Text("slow " * 2000, chunk=5, delay_s=0.1))
    async with httpx.AsyncClient(base_url=server.http) as http:
        before = metric((await http.get("/metrics")).text, "parley_supervisor_accepting")
        async with server.connect(unique_user()) as client:
            accepted = await client.ask(f"outlast the grace period {t}")
            await client.recv_type("agent_message_delta")
            server.proc.send_signal(signal.SIGTERM)
            signalled = len(client.frames)
            await wait_for_readiness(server.http, 503, timeout=5)
            during = metric((await http.get("/metrics")).text, "parley_supervisor_accepting")
            # A handshake that completes during the drain is closed at once, with no frame.
            refused, code = await _connect_during_drain(server.ws_url)
            # The watchdog (it looks every 5 s) notices the supervisor stopped accepting work.
            deadline = time.monotonic() + 20
            while "watchdog.supervisor_not_accepting" not in server.read_log():
                assert time.monotonic() < deadline, server.read_log()[-2000:]
                with contextlib.suppress(TimeoutError):
                    await client.recv(timeout=0.2)
            streamed = [
                f
                for f in client.frames[signalled:]
                if f["type"] == "agent_message_delta" and f["run_id"] == accepted["run_id"]
            ]
            server.proc.send_signal(signal.SIGTERM)
            # Well before the grace period would end: the bound only says "not never".
            try:
                exit_code = await asyncio.to_thread(server.proc.wait, grace_s / 2)
            except subprocess.TimeoutExpired:
                pytest.fail("the second signal did not skip the grace wait")
    assert before == 1
    assert during == 0
    assert (refused, code) == ([], 1001)
    assert len(streamed) >= 3, "the run did not go on streaming during the grace period"
    assert exit_code == 0


async def test_a_second_signal_still_ends_each_run_with_server_shutdown_and_closes_1001(
    spawn: SpawnServer, fake_llm: FakeLLM
) -> None:
    server = spawn(SHUTDOWN_GRACE_S="100")
    assert server.proc is not None
    t = fake_llm.script(f"T{uuid.uuid4().hex[:10]}", Text("slow " * 2000, chunk=5, delay_s=0.1))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"outlast the grace period {t}")
        await client.recv_type("agent_message_delta")
        server.proc.send_signal(signal.SIGTERM)
        await wait_for_readiness(server.http, 503, timeout=5)
        server.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(ConnectionClosed):
            while True:
                await client.recv(timeout=30)
    events = client.events_of(accepted["run_id"])
    assert events[-1]["type"] == "agent_cancelled", [e["type"] for e in events[-3:]]
    assert events[-1]["reason"] == "server_shutdown"
    assert client.ws.close_code == 1001
    assert server.stop() == 0
