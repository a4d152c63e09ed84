"""Issue 9's whole benchmark in one command: Parley and the peer, side by side, in one run.

    make bench     # = .venv/bin/python -m bench.bench_all [--levels ...] [--peer-levels ...]

1. The peer's environment: `var/peer`, made with uv from `bench/peer/requirements.txt` (every
   version pinned) unless it is there already.
2. Parley (`bench_streams`): plain runs (one client; 50 clients) and the streaming levels.
3. The peer (`bench_peer`, the LangGraph dev server): the same workloads; fewer serial runs and
   fewer streaming levels by default, since it takes about a second per run and queues its
   streams (see bench/README.md).
4. Writes `bench/results/last.json` (machine, date, commit and every figure), draws
   `bench/results/streams.svg` (run time against concurrent streams, both servers) and prints
   the tables for bench/README.md.

About six minutes on the 2-core development machine, most of it the peer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "bench" / "results"
PEER_VENV = ROOT / "var" / "peer"


def peer_langgraph() -> Path:
    """The peer's `langgraph` command, installing its environment first if needed."""
    command = PEER_VENV / "bin" / "langgraph"
    if command.exists():
        return command
    uv = str(ROOT / ".venv" / "bin" / "uv")  # what `make install` put there
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(PEER_VENV)], check=True)
    subprocess.run(
        [uv, "pip", "install", "--quiet", "--python", str(PEER_VENV / "bin" / "python"),
         "-r", str(ROOT / "bench" / "peer" / "requirements.txt")],
        check=True,
    )  # fmt: skip
    return command


def run_json(module: str, *args: str) -> list[dict[str, Any]]:
    """Run one benchmark script; its JSON lines."""
    output = subprocess.run(
        [sys.executable, "-m", module, "--json", *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def machine() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
    }


# ---------------------------------------------------------------------------- the plot
# Drawn by hand as SVG: the benchmark needs no plotting library in the project's lock.


def plot(parley: list[dict[str, Any]], peer: list[dict[str, Any]], path: Path) -> None:
    """Run time (p50 and p95, log scale) against concurrent streams, both servers."""
    width, height, left, bottom, top, right = 640, 380, 70, 50, 40, 150
    levels = sorted({r["level"] for r in parley + peer})
    times = [r[k] for r in parley + peer for k in ("p50_s", "p95_s")]
    low = 10 ** math.floor(math.log10(min([*times, 1.0])))
    high = 10 ** math.ceil(math.log10(max(times)))

    def x(level: int) -> float:
        return left + (width - left - right) * levels.index(level) / max(1, len(levels) - 1)

    def y(seconds: float) -> float:
        span = math.log10(high) - math.log10(low)
        return top + (height - top - bottom) * (1 - (math.log10(seconds) - math.log10(low)) / span)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="14">Run time against concurrent streams '
        "(40 tokens 25 ms apart: ideal 1.0 s)</text>",
    ]
    decade = low
    while decade <= high:
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(decade):.1f}" y2="{y(decade):.1f}" '
            'stroke="#ddd"/>'
            f'<text x="{left - 8}" y="{y(decade) + 4:.1f}" text-anchor="end">{decade:g} s</text>'
        )
        decade *= 10
    for level in levels:
        parts.append(
            f'<text x="{x(level):.1f}" y="{height - bottom + 18}" '
            f'text-anchor="middle">{level}</text>'
        )
    parts.append(
        f'<text x="{(left + width - right) / 2:.1f}" y="{height - 12}" text-anchor="middle">'
        "concurrent streams</text>"
    )
    series = [
        ("Parley p95", parley, "p95_s", "#1f6feb", ""),
        ("Parley p50", parley, "p50_s", "#1f6feb", ' stroke-dasharray="5,4"'),
        ("peer p95", peer, "p95_s", "#d1242f", ""),
        ("peer p50", peer, "p50_s", "#d1242f", ' stroke-dasharray="5,4"'),
    ]
    for index, (name, rows, key, colour, dash) in enumerate(series):
        rows = sorted(rows, key=lambda r: r["level"])
        if not rows:
            continue
        points = " ".join(f"{x(r['level']):.1f},{y(r[key]):.1f}" for r in rows)
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'
        )
        parts.extend(
            f'<circle cx="{x(r["level"]):.1f}" cy="{y(r[key]):.1f}" r="3" fill="{colour}"/>'
            for r in rows
        )
        legend_y = top + 10 + 20 * index
        parts.append(
            f'<line x1="{width - right + 15}" x2="{width - right + 40}" y1="{legend_y}" '
            f'y2="{legend_y}" stroke="{colour}" stroke-width="2"{dash}/>'
            f'<text x="{width - right + 46}" y="{legend_y + 4}">{name}</text>'
        )
    parts.append(
        f'<line x1="{left}" x2="{width - right}" y1="{y(1.0):.1f}" y2="{y(1.0):.1f}" '
        'stroke="#888" stroke-dasharray="2,3"/>'
        f'<text x="{width - right + 4}" y="{y(1.0) + 4:.1f}" fill="#888">ideal</text>'
    )
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


# ---------------------------------------------------------------------------- the tables


def tables(parley: list[dict[str, Any]], peer: list[dict[str, Any]]) -> str:
    by_level = {r["level"]: r for r in peer if r["workload"] == "streams"}
    lines = [
        "| streams | p50 / p95 run time | p95 first delta | p95 largest gap | CPU per token "
        "| peer p50 / p95 | peer CPU per token | ratio (CPU per token) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in parley if r["workload"] == "streams"):
        p = by_level.get(r["level"])
        peer_cells = (
            f"{p['p50_s']:.2f} / {p['p95_s']:.2f} s | {p['cpu_per_token_us']:,.0f} µs | "
            f"{p['cpu_per_token_us'] / r['cpu_per_token_us']:.0f}×"
            if p
            else "– | – | –"
        )
        lines.append(
            f"| {r['level']} | {r['p50_s']:.2f} / {r['p95_s']:.2f} s | {r['first95_ms']:.0f} ms "
            f"| {r['gap95_ms']:.0f} ms | {r['cpu_per_token_us']:.0f} µs | {peer_cells} |"
        )
    plain = [r for r in parley if r["workload"] == "plain"]
    peer_plain = {r["clients"]: r for r in peer if r["workload"] == "plain"}
    lines += [
        "",
        "| plain runs | p50 | runs/s | CPU per run | peer p50 | peer runs/s | peer CPU per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in plain:
        p = peer_plain.get(r["clients"])
        peer_cells = (
            f"{p['p50_ms']:,.1f} ms | {p['runs_per_s']:.1f} | {p['cpu_per_run_ms']:.1f} ms"
            if p
            else "– | – | –"
        )
        lines.append(
            f"| {r['clients']} client(s), {r['runs']} runs | {r['p50_ms']:.1f} ms "
            f"| {r['runs_per_s']:.1f} | {r['cpu_per_run_ms']:.2f} ms | {peer_cells} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="25,50,100,200")
    parser.add_argument("--peer-levels", default="25,50,100")
    parser.add_argument("--peer-serial", default="30")
    parser.add_argument("--peer-runs", default="500")
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()

    parley = run_json("bench.bench_streams", "--levels", args.levels)
    peer: list[dict[str, Any]] = []
    if not args.no_peer:
        langgraph = peer_langgraph()
        peer = run_json(
            "bench.bench_peer",
            "--langgraph", str(langgraph),
            "--levels", args.peer_levels,
            "--serial", args.peer_serial,
            "--runs", args.peer_runs,
        )  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    record = {**machine(), "parley": parley, "peer": peer}
    (RESULTS / "last.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(
        [r for r in parley if r["workload"] == "streams"],
        [r for r in peer if r["workload"] == "streams"],
        RESULTS / "streams.svg",
    )
    print(f"{record['date']}, commit {record['commit']}, {record['machine']}\n")
    print(tables(parley, peer))


if __name__ == "__main__":
    main()
