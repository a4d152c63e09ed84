"""Shared fixtures: the scripted LLM server, real Parley servers, PostgreSQL and Redis URLs."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.fakes.llm_server import FakeLLM
from tests.harness import ServerProcess, base_env

SpawnServer = Callable[..., ServerProcess]


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeLLM]:
    """One scripted LLM server per xdist worker; tests script it by unique trigger words."""
    fake = FakeLLM()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def private_llm() -> Iterator[FakeLLM]:
    """A scripted LLM server of the test's own, for counting every request it sees."""
    fake = FakeLLM()
    fake.start()
    yield fake
    fake.stop()


def llm_env(fake: FakeLLM) -> dict[str, str]:
    return {
        "LLM_PROVIDER": "openai",
        "LLM_MODEL": "fake-model",
        "LLM_BASE_URL": fake.base_url,
        "LLM_MAX_RETRIES": "0",
        "LLM_TIMEOUT_S": "10",
    }


@pytest.fixture
def spawn(fake_llm: FakeLLM, tmp_path: Path) -> Iterator[SpawnServer]:
    """Start a Parley server with extra environment; every one is stopped after the test."""
    started: list[ServerProcess] = []

    def _spawn(
        *, wait_ready: bool = True, data_dir: Path | None = None, **env: str
    ) -> ServerProcess:
        directory = data_dir or tmp_path / f"server{len(started)}"
        server = ServerProcess(base_env(directory, **{**llm_env(fake_llm), **env}))
        started.append(server)
        return server.start(wait_ready=wait_ready)

    yield _spawn
    for server in started:
        server.stop()


def spawn_pair(
    spawn: SpawnServer, database_url: str, redis_url: str, **env: str
) -> tuple[ServerProcess, ServerProcess]:
    """Two instances of one deployment, A and B: the same database and Redis (and `env`)."""
    shared = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, **env}
    return spawn(**shared), spawn(**shared)


@pytest.fixture(scope="module")
def server(fake_llm: FakeLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One default server shared by a module's tests; each test uses its own users."""
    directory = tmp_path_factory.mktemp("shared-server")
    process = ServerProcess(base_env(directory, **llm_env(fake_llm), RATE_LIMIT_PER_MINUTE="1000"))
    process.start()
    yield process
    process.stop()


def _service_url(variable: str, what: str) -> str:
    url = os.environ.get(variable)
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} is required under CI; scripts/test-services.sh should start it")
        pytest.skip(f"{what} not available ({variable} unset); run `make test` to start it")
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty database on the test PostgreSQL server, dropped after the test."""
    server_url = _service_url("PARLEY_TEST_POSTGRES_URL", "PostgreSQL")
    name = f"parley_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    yield server_url.rsplit("/", 1)[0] + "/" + name
    asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _admin(server_url: str, statement: str) -> None:
    dsn = server_url.replace("postgresql+asyncpg://", "postgresql://")
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture
def redis_url() -> str:
    return _service_url("PARLEY_TEST_REDIS_URL", "Redis")
