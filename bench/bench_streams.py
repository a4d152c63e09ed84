"""Streaming capacity and per-run cost of one `parley serve` (issue 9's workloads).

    .venv/bin/python -m bench.bench_streams [--levels 25,50,100,200] [--tokens 40] [--delay-ms 25]
                                            [--serial 200] [--clients 50] [--runs 1000]

On loopback: the scripted model (`bench.model_server`, its own process), a real `parley serve`
(SQLite, in-process bus) and this load generator (uvloop). Two workloads:

- **streams**: C clients, each its own user, send one message at the same moment; the model
  streams each answer as `tokens` tokens `delay-ms` apart (an ideal run lasts tokens x delay).
  Per level: p50/p95 run time (message sent -> terminal event), p95 of each client's largest
  gap between two deltas, and the server's CPU per streamed token. Every answer is checked:
  the deltas concatenated equal the model's text and `agent_completed.content`.
- **plain**: answers at once; one client's serial runs (p50, CPU per run), then `clients`
  clients sharing `runs` runs (runs/s, CPU per run).

CPU is read from /proc (the server process and its children) over each phase only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
import websockets

from parley.gc_settings import tune_for_serving

sys.path.insert(0, str(Path(__file__).parents[1]))

from tests.harness import ServerProcess, base_env, make_token

from bench.model_server import expected_text, stream_marker
from bench.ports import free_port
from bench.procstat import Usage, Window

TERMINAL = {"agent_completed", "agent_error", "agent_cancelled"}
MODEL_PID = [0]  # the scripted model's process, measured beside the server


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class RunTrace:
    sent: float = 0.0
    ended: float = 0.0
    deltas: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    terminal: dict[str, Any] = field(default_factory=dict)

    @property
    def first_delta(self) -> float:
        """From the message sent to the first piece of the answer."""
        return self.deltas[0] - self.sent if self.deltas else self.ended - self.sent

    @property
    def largest_gap(self) -> float:
        """The longest wait between two consecutive pieces of the answer (issue 9's measure;
        the wait for the first piece is `first_delta`)."""
        return max((b - a for a, b in itertools.pairwise(self.deltas)), default=0.0)


async def _read_run(ws: Any, trace: RunTrace) -> None:
    while True:
        frame = json.loads(await ws.recv())
        kind = frame["type"]
        if kind == "agent_message_delta":
            trace.deltas.append(time.perf_counter())
            trace.text.append(frame["text"])
        elif kind in TERMINAL:
            trace.ended = time.perf_counter()
            trace.terminal = frame
            return
        elif kind == "error":
            raise RuntimeError(f"refused: {frame}")


def _check(trace: RunTrace, expected: str) -> None:
    text = "".join(trace.text)
    if trace.terminal.get("type") != "agent_completed":
        raise RuntimeError(f"run did not complete: {trace.terminal}")
    if text != expected or trace.terminal["content"] != expected:
        raise RuntimeError(f"answer mismatch: {text[:80]!r} / {trace.terminal['content'][:80]!r}")


async def _connect(url: str, user: str) -> Any:
    headers = {"Authorization": f"Bearer {make_token(user)}"}
    ws = await websockets.connect(url, additional_headers=headers, max_size=None)
    await ws.recv()  # system_message
    return ws


async def streams(
    server: ServerProcess, level: int, tokens: int, delay_ms: int, profile: Path | None = None
) -> dict[str, Any]:
    assert server.proc is not None
    sockets = await asyncio.gather(
        *(_connect(server.ws_url, f"s{level}-{i}-{time.time_ns()}") for i in range(level))
    )
    traces = [RunTrace() for _ in sockets]
    go = asyncio.Event()

    async def one(ws: Any, trace: RunTrace) -> None:
        await go.wait()
        trace.sent = time.perf_counter()
        content = f"stream please {stream_marker(tokens, delay_ms)}"
        await ws.send(json.dumps({"type": "user_message", "content": content}))
        await _read_run(ws, trace)

    window = Window(
        {"server": server.proc.pid, "model": MODEL_PID[0]}, rss_of=server.proc.pid, loop_of="server"
    )
    spy = await _start_profiler(server.proc.pid, profile, f"streams-{level}") if profile else None
    window.start()
    tasks = [asyncio.ensure_future(one(ws, t)) for ws, t in zip(sockets, traces, strict=True)]
    go.set()
    await asyncio.gather(*tasks)
    usage = await window.stop()
    _stop_profiler(spy)
    for ws in sockets:
        await ws.close()
    for trace in traces:
        _check(trace, expected_text(tokens))
    return stream_summary(level, tokens, traces, usage)


async def _start_profiler(pid: int, directory: Path, label: str) -> subprocess.Popen[bytes]:
    """py-spy sampling the server over one measured window only (not its startup, nor the
    connections being opened or closed): raw folded stacks, one file per window."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{label}-{time.time_ns()}.raw"
    command = [os.environ.get("PY_SPY", "py-spy"), "record", "--pid", str(pid), "--format", "raw"]
    command += ["--rate", "500", "--nonblocking", "--threads", "--output", str(out)]
    spy = subprocess.Popen(
        [*command, *os.environ.get("PY_SPY_ARGS", "").split()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await asyncio.sleep(0.5)  # attached and sampling
    return spy


def _stop_profiler(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its samples when interrupted
        spy.wait()


def stream_summary(level: int, tokens: int, traces: list[RunTrace], usage: Usage) -> dict[str, Any]:
    """One streaming level's figures (shared with the peer's benchmark)."""
    times = [t.ended - t.sent for t in traces]
    firsts = [t.first_delta for t in traces]
    gaps = [t.largest_gap for t in traces]
    return {
        "level": level,
        "p5_s": percentile(times, 5),
        "p50_s": percentile(times, 50),
        "p95_s": percentile(times, 95),
        "first50_ms": percentile(firsts, 50) * 1000,
        "first95_ms": percentile(firsts, 95) * 1000,
        "gap95_ms": percentile(gaps, 95) * 1000,
        "cpu_per_token_us": usage.cpu_s["server"] / (level * tokens) * 1e6,
        "server_cpu_s": usage.cpu_s["server"],
        # The event loop's thread alone; the rest is the database threads.
        **(
            {"server_loop_cpu_s": usage.cpu_s["server_loop"]}
            if "server_loop" in usage.cpu_s
            else {}
        ),
        "wall_s": usage.wall_s,
        "loadgen_cpu_s": usage.cpu_s["loadgen"],
        "model_cpu_s": usage.cpu_s["model"],
    }


async def plain_client(url: str, user: str, count: int, times: list[float]) -> None:
    ws = await _connect(url, user)
    thread_id = None
    for i in range(count):
        message: dict[str, Any] = {"type": "user_message", "content": f"hello {i}"}
        if thread_id:
            message["thread_id"] = thread_id
        trace = RunTrace(sent=time.perf_counter())
        await ws.send(json.dumps(message))
        await _read_run(ws, trace)
        _check(trace, expected_text(4))
        thread_id = trace.terminal["thread_id"]
        times.append(trace.ended - trace.sent)
    await ws.close()


async def plain(
    server: ServerProcess, clients: int, runs: int, profile: Path | None = None
) -> dict[str, Any]:
    assert server.proc is not None
    times: list[float] = []
    per_client = max(1, runs // clients)
    window = Window({"server": server.proc.pid, "model": MODEL_PID[0]}, rss_of=server.proc.pid)
    spy = await _start_profiler(server.proc.pid, profile, f"plain-{clients}") if profile else None
    window.start()
    stamp = time.time_ns()
    await asyncio.gather(
        *(plain_client(server.ws_url, f"p{clients}-{i}-{stamp}", per_client, times)
          for i in range(clients))
    )  # fmt: skip
    usage = await window.stop()
    _stop_profiler(spy)
    return {
        "clients": clients,
        "runs": len(times),
        "p50_ms": percentile(times, 50) * 1000,
        "p95_ms": percentile(times, 95) * 1000,
        "runs_per_s": len(times) / usage.wall_s,
        "cpu_per_run_ms": usage.cpu_s["server"] / len(times) * 1000,
    }


def start_model_server() -> tuple[subprocess.Popen[str], str]:
    model = subprocess.Popen(
        [sys.executable, "-m", "bench.model_server"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert model.stdout is not None
    MODEL_PID[0] = model.pid
    port = int(model.stdout.readline().split()[-1])
    return model, f"http://127.0.0.1:{port}/v1"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="25,50,100,200")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--delay-ms", type=int, default=25)
    parser.add_argument("--serial", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print raw results as JSON lines")
    parser.add_argument(
        "--profile",
        type=Path,
        help="sample the server with py-spy (on PATH, or $PY_SPY) over each streaming window "
        "into this directory, as raw folded stacks (bench/README.md: profiling)",
    )
    parser.add_argument(
        "--src",
        help="serve Parley from this source tree instead (e.g. a git worktree of an older "
        "commit, to compare in the same run on the same machine)",
    )
    args = parser.parse_args()

    model, model_url = start_model_server()
    with tempfile.TemporaryDirectory() as directory:
        env = base_env(
            Path(directory),
            LLM_PROVIDER="openai",
            LLM_MODEL="bench-model",
            LLM_BASE_URL=model_url,
            LOG_LEVEL="WARNING",
            RATE_LIMIT_PER_MINUTE="1000000",
            MAX_CONCURRENT_RUNS="100000",
            MAX_RUNS_PER_USER="1000",
            **({"PYTHONPATH": args.src} if args.src else {}),
        )
        # A fixed port: at LOG_LEVEL=WARNING the server does not log the one it bound.
        server = ServerProcess(env, free_port()).start()
        results: list[dict[str, Any]] = []
        try:
            await plain(server, 1, 20)  # warm-up: imports, first connections, SQLite pages
            if args.serial:
                results.append({"workload": "plain", **await plain(server, 1, args.serial)})
            if args.runs:
                results.append(
                    {
                        "workload": "plain",
                        **await plain(server, args.clients, args.runs, args.profile),
                    }
                )
            for level in (int(x) for x in args.levels.split(",") if x):
                result = await streams(server, level, args.tokens, args.delay_ms, args.profile)
                results.append({"workload": "streams", **result})
                await asyncio.sleep(1)
        finally:
            server.stop()
            model.terminate()
            model.wait()
    print_results(results, as_json=args.json)


def print_results(results: list[dict[str, Any]], *, as_json: bool, label: str = "") -> None:
    """One line per workload (shared with the peer's benchmark), or raw JSON lines."""
    for result in results:
        if as_json:
            print(json.dumps(result))
        elif result["workload"] == "plain":
            print(
                f"{label}plain  clients={result['clients']:>3} runs={result['runs']:>5} "
                f"p50={result['p50_ms']:7.1f} ms p95={result['p95_ms']:7.1f} ms "
                f"runs/s={result['runs_per_s']:6.1f} cpu/run={result['cpu_per_run_ms']:6.2f} ms"
            )
        else:
            print(
                f"{label}streams C={result['level']:>3} p5={result['p5_s']:5.2f} s "
                f"p50={result['p50_s']:5.2f} s p95={result['p95_s']:5.2f} s "
                f"first p50/p95={result['first50_ms']:4.0f}/{result['first95_ms']:4.0f} ms "
                f"gap95={result['gap95_ms']:6.1f} ms "
                f"cpu/token={result['cpu_per_token_us']:7.0f} us "
                f"(server {result['server_cpu_s']:.2f} s cpu{_loop_share(result)} / "
                f"{result['wall_s']:.1f} s wall; "
                f"loadgen {result['loadgen_cpu_s']:.1f} s, model {result['model_cpu_s']:.1f} s)"
            )


def _loop_share(result: dict[str, Any]) -> str:
    loop = result.get("server_loop_cpu_s")
    return "" if loop is None else f", {loop:.2f} s of it the event loop's thread"


if __name__ == "__main__":
    # The harness must not stall what it measures: its collector is tuned as the server's is.
    tune_for_serving()
    uvloop.run(main())
