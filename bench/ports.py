"""A free loopback port for the servers a benchmark starts that cannot bind port 0 themselves
(uvicorn's echo app, `langgraph dev`). Picking a port that is bound later is racy; a benchmark
runs alone on a quiet machine, so that is acceptable here (the test suite does not do this:
see `tests/harness.py`)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
