"""The peer: the same workloads as `bench_streams`, against the LangGraph dev server.

    .venv/bin/python -m bench.bench_peer --langgraph /path/to/venv/bin/langgraph \\
        [--levels 100,200] [--serial 200] [--clients 50] [--runs 1000]

The peer runs in a virtual environment of its own (see bench/README.md for the locked
versions): `langgraph dev` (in-memory runtime) serving `bench/peer/graph.py`, a one-node graph
that calls the same scripted model (`bench.model_server`) through ChatOpenAI, streamed to the
client with `stream_mode=messages-tuple`. A run is: POST /threads/{id}/runs/stream, read the
server-sent events to the end; the answer is checked like Parley's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import uvloop

from parley.gc_settings import tune_for_serving

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.bench_streams import (
    MODEL_PID,
    RunTrace,
    percentile,
    print_results,
    start_model_server,
    stream_summary,
)
from bench.model_server import expected_text, stream_marker
from bench.ports import free_port
from bench.procstat import Window

PEER_DIR = Path(__file__).parent / "peer"


async def one_run(http: httpx.AsyncClient, thread_id: str, content: str) -> RunTrace:
    """The run's timeline and its streamed text."""
    body = {
        "assistant_id": "agent",
        "input": {"messages": [{"role": "user", "content": content}]},
        "stream_mode": "messages-tuple",
    }
    trace = RunTrace(sent=time.perf_counter())
    event = ""
    async with http.stream("POST", f"/threads/{thread_id}/runs/stream", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "messages":
                chunk, _meta = json.loads(line[5:])
                if chunk.get("type") in ("AIMessageChunk", "ai") and chunk.get("content"):
                    trace.text.append(chunk["content"])
                    trace.deltas.append(time.perf_counter())
    trace.ended = time.perf_counter()
    return trace


async def new_thread(http: httpx.AsyncClient) -> str:
    return str((await http.post("/threads", json={})).json()["thread_id"])


async def streams(url: str, pid: int, level: int, tokens: int, delay_ms: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=level + 10)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        threads = [await new_thread(http) for _ in range(level)]
        window = Window({"server": pid, "model": MODEL_PID[0]}, rss_of=pid)
        window.start()
        content = f"stream please {stream_marker(tokens, delay_ms)}"
        results = await asyncio.gather(*(one_run(http, t, content) for t in threads))
        usage = await window.stop()
    for trace in results:
        if "".join(trace.text) != expected_text(tokens):
            raise RuntimeError(f"answer mismatch: {''.join(trace.text)[:80]!r}")
    return stream_summary(level, tokens, results, usage)


async def plain(url: str, pid: int, clients: int, runs: int) -> dict[str, Any]:
    times: list[float] = []
    per_client = max(1, runs // clients)

    async def client(http: httpx.AsyncClient) -> None:
        thread_id = await new_thread(http)
        for i in range(per_client):
            trace = await one_run(http, thread_id, f"hello {i}")
            if "".join(trace.text) != expected_text(4):
                raise RuntimeError(f"answer mismatch: {''.join(trace.text)!r}")
            times.append(trace.ended - trace.sent)

    limits = httpx.Limits(max_connections=clients + 10)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        window = Window({"server": pid, "model": MODEL_PID[0]}, rss_of=pid)
        window.start()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        usage = await window.stop()
    return {
        "clients": clients,
        "runs": len(times),
        "p50_ms": percentile(times, 50) * 1000,
        "p95_ms": percentile(times, 95) * 1000,
        "runs_per_s": len(times) / usage.wall_s,
        "cpu_per_run_ms": usage.cpu_s["server"] / len(times) * 1000,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--langgraph", required=True, help="the peer venv's `langgraph` command")
    parser.add_argument("--levels", default="100,200")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--delay-ms", type=int, default=25)
    parser.add_argument("--serial", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print raw results as JSON lines")
    args = parser.parse_args()

    model, model_url = start_model_server()
    port = free_port()
    peer = subprocess.Popen(
        [args.langgraph, "dev", "--no-browser", "--no-reload", "--port", str(port)],
        cwd=PEER_DIR,
        env={**os.environ, "BENCH_MODEL_URL": model_url, "LANGGRAPH_NO_ANALYTICS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/ok", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        await plain(url, peer.pid, 1, 10)  # warm-up
        results: list[dict[str, Any]] = []
        if args.serial:
            results.append({"workload": "plain", **await plain(url, peer.pid, 1, args.serial)})
        if args.runs:
            r = await plain(url, peer.pid, args.clients, args.runs)
            results.append({"workload": "plain", **r})
        for level in (int(x) for x in args.levels.split(",") if x):
            r = await streams(url, peer.pid, level, args.tokens, args.delay_ms)
            results.append({"workload": "streams", **r})
        print_results(results, as_json=args.json, label="peer ")
    finally:
        peer.terminate()
        peer.wait()
        model.terminate()
        model.wait()


if __name__ == "__main__":
    # The harness must not stall what it measures: its collector is tuned as the server's is.
    tune_for_serving()
    uvloop.run(main())
