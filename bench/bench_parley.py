"""Parley's benchmarks: platform overhead per run, runs per second, memory per idle connection.

    .venv/bin/python -m bench.bench_parley [--runs 2000] [--clients 50] [--idle 1000]

Everything runs on loopback: a real `parley serve` (SQLite, in-process bus) whose model is the
scripted OpenAI-compatible server answering at once, and, as the baseline, a bare WebSocket
echo endpoint on the same stack (uvicorn + Starlette, same event loop implementation). Results
are printed as a Markdown table; bench/README.md keeps the last ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import websockets

sys.path.insert(0, str(Path(__file__).parents[1]))

from tests.fakes.llm_server import FakeLLM
from tests.harness import ServerProcess, base_env, make_token

from bench.ports import free_port

ECHO_APP = """
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

async def echo(ws):
    await ws.accept()
    while True:
        await ws.send_text(await ws.receive_text())

app = Starlette(routes=[WebSocketRoute("/ws", echo)])
"""


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def echo_baseline(requests: int) -> list[float]:
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "echo_app.py").write_text(ECHO_APP)
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "echo_app:app", "--port", str(port),
             "--log-level", "warning", "--loop", "uvloop"],
            cwd=directory,
        )  # fmt: skip
        try:
            for _ in range(100):
                try:
                    async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
                        latencies = []
                        for _ in range(requests):
                            started = time.perf_counter()
                            await ws.send('{"type": "ping"}')
                            await ws.recv()
                            latencies.append(time.perf_counter() - started)
                        return latencies
                except OSError:
                    await asyncio.sleep(0.1)
            raise RuntimeError("echo server did not start")
        finally:
            process.terminate()
            process.wait()


async def one_client(url: str, user: str, count: int, latencies: list[float]) -> None:
    headers = {"Authorization": f"Bearer {make_token(user)}"}
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.recv()
        thread_id = None
        for i in range(count):
            message: dict[str, Any] = {"type": "user_message", "content": f"hello {i}"}
            if thread_id:
                message["thread_id"] = thread_id
            started = time.perf_counter()
            await ws.send(json.dumps(message))
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "error":
                    raise RuntimeError(frame)
                if frame["type"] in ("agent_completed", "agent_error", "agent_cancelled"):
                    if frame["type"] != "agent_completed":
                        raise RuntimeError(frame)
                    thread_id = frame["thread_id"]
                    break
            latencies.append(time.perf_counter() - started)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def idle_connections(server: ServerProcess, count: int) -> float:
    assert server.proc is not None
    before = rss_kib(server.proc.pid)
    sockets = []
    headers = {"Authorization": f"Bearer {make_token('idle')}"}
    for i in range(count):
        ws = await websockets.connect(
            server.ws_url, additional_headers={**headers, "X-Idle": str(i)}
        )
        await ws.recv()
        sockets.append(ws)
    await asyncio.sleep(2)
    after = rss_kib(server.proc.pid)
    for ws in sockets:
        await ws.close()
    return (after - before) / count


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--idle", type=int, default=1000)
    args = parser.parse_args()

    echo = await echo_baseline(2000)

    fake = FakeLLM()
    fake.start()
    with tempfile.TemporaryDirectory() as directory:
        env = base_env(
            Path(directory),
            LLM_PROVIDER="openai",
            LLM_MODEL="fake-model",
            LLM_BASE_URL=fake.base_url,
            LOG_LEVEL="WARNING",
            RATE_LIMIT_PER_MINUTE="100000",
            MAX_CONCURRENT_RUNS="10000",
            MAX_CONNECTIONS_PER_USER=str(args.idle + 10),
        )
        server = ServerProcess(env, free_port()).start()
        try:
            single: list[float] = []
            await one_client(server.ws_url, "serial", 200, single)
            concurrent: list[float] = []
            per_client = max(1, args.runs // args.clients)
            started = time.perf_counter()
            await asyncio.gather(
                *(one_client(server.ws_url, f"u{i}", per_client, concurrent)
                  for i in range(args.clients))
            )  # fmt: skip
            elapsed = time.perf_counter() - started
            per_connection_kib = await idle_connections(server, args.idle)
            ready = httpx.get(server.http + "/health/ready").json()
        finally:
            server.stop()
            fake.stop()

    ms = 1000.0
    print("| measure | value |")
    print("|---|---|")
    print(
        f"| bare WebSocket echo round trip, p50 / p95 | "
        f"{percentile(echo, 50) * ms:.2f} / {percentile(echo, 95) * ms:.2f} ms |"
    )
    print(
        f"| one run, message in → terminal event out (instant model), p50 / p95 | "
        f"{percentile(single, 50) * ms:.2f} / {percentile(single, 95) * ms:.2f} ms |"
    )
    print(
        f"| runs/s, {args.clients} concurrent clients, {len(concurrent)} runs | "
        f"{len(concurrent) / elapsed:.0f} |"
    )
    print(
        f"| run latency under that load, p50 / p95 | "
        f"{percentile(concurrent, 50) * ms:.1f} / {percentile(concurrent, 95) * ms:.1f} ms |"
    )
    print(
        f"| server memory per idle connection ({args.idle} connections) | "
        f"{per_connection_kib:.1f} KiB |"
    )
    print(
        f"\nmean serial run / mean echo: "
        f"{statistics.mean(single) / statistics.mean(echo):.1f}x; "
        f"database: {ready['components']['database']['backend']}"
    )


if __name__ == "__main__":
    asyncio.run(main())
