"""CPU time and memory of processes, read from /proc (Linux).

A server's CPU is the user + system time of its process (all its threads) and of its live
descendants, so work a server hands to a child process is counted too; the benchmark's own
processes (the scripted model, the load generator) are measured separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int, stat: str = "stat") -> list[str]:
    text = Path(f"/proc/{pid}/{stat}").read_text()
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    return text[text.rindex(")") + 2 :].split()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                tree.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
    return tree


def _tree(pid: int) -> Iterator[int]:
    children = _children()
    pending = [pid]
    while pending:
        current = pending.pop()
        yield current
        pending.extend(children.get(current, []))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live descendants so far."""
    total = 0
    for member in _tree(pid):
        with contextlib.suppress(OSError):
            fields = _stat_fields(member)
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def thread_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the main thread of `pid` alone (a Python server's event
    loop; its other threads are database and executor threads)."""
    fields = _stat_fields(pid, f"task/{pid}/stat")
    return (int(fields[11]) + int(fields[12])) / _TICKS


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process (the load generator)."""
    times = os.times()
    return times.user + times.system


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Usage:
    """CPU seconds used by each measured process over one window, and its wall time."""

    wall_s: float
    cpu_s: dict[str, float]
    peak_rss_kib: int


@dataclass
class Window:
    """Measures CPU of named processes (and this one, as `loadgen`) between `start` and `stop`,
    and the peak RSS of `rss_of` sampled every `interval` seconds meanwhile."""

    pids: dict[str, int]
    rss_of: int
    # Also measured alone as "<name>_loop": the named process's main thread (its event loop).
    loop_of: str | None = None
    interval: float = 0.1
    _cpu0: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0
    _peak: int = 0
    _sampler: asyncio.Task[None] | None = None

    def _cpu(self) -> dict[str, float]:
        cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        if self.loop_of is not None:
            cpu[f"{self.loop_of}_loop"] = thread_cpu_seconds(self.pids[self.loop_of])
        cpu["loadgen"] = own_cpu_seconds()
        return cpu

    def start(self) -> None:
        self._peak = rss_kib(self.rss_of)
        self._sampler = asyncio.get_running_loop().create_task(self._sample())
        self._t0 = asyncio.get_running_loop().time()
        self._cpu0 = self._cpu()

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._peak = max(self._peak, rss_kib(self.rss_of))

    async def stop(self) -> Usage:
        cpu = self._cpu()
        wall = asyncio.get_running_loop().time() - self._t0
        assert self._sampler is not None
        self._sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sampler
        self._peak = max(self._peak, rss_kib(self.rss_of))
        return Usage(wall, {k: cpu[k] - self._cpu0[k] for k in cpu}, self._peak)
