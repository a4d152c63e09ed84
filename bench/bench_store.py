"""What storing a streamed delta costs once the store is large, with random ids and with
time-ordered ids (`queries.new_ids`), side by side.

    .venv/bin/python -m bench.bench_store [--stored 300000] [--threads 200] [--batches 50]

Each variant gets its own SQLite file, set up as the event log's writer (store/db.py), filled
with `--stored` events of 2,000 older threads and runs; then `--threads` new conversations each
store one delta per batch, as at that many concurrent streams: the batch's seqs are taken and
its events inserted in one transaction, exactly as the event log does (`reserve_seqs`,
`insert_events`). Reported: the time per stored event in the database thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine

from parley.protocol import AgentMessageDelta
from parley.store import queries
from parley.store.db import _configure_sqlite
from parley.store.models import Base, utcnow

FILL_BATCH = 2000
OLDER_THREADS = 2000


def random_id() -> str:
    return str(uuid.uuid4())  # what every id was before (version 4)


def per_event_us(
    directory: Path, new_id: Callable[[], str], stored: int, threads: int, batches: int
) -> float:
    engine = create_engine(f"sqlite:///{directory / 'store.db'}", pool_reset_on_return=None)
    _configure_sqlite(engine, immediate=True)
    Base.metadata.create_all(engine)
    frame = AgentMessageDelta(text=" tok1 tok2", thread_id=random_id(), run_id=random_id())
    text = frame.to_json()

    def rows(thread_ids: list[str], run_ids: list[str], seqs: list[int]) -> list[dict[str, object]]:
        now = utcnow()
        return [
            {
                "id": new_id(),
                "thread_id": thread,
                "run_id": run,
                "seq": seq,
                "type": "agent_message_delta",
                "frame": text,
                "created_at": now,
            }
            for thread, run, seq in zip(thread_ids, run_ids, seqs, strict=True)
        ]

    with engine.begin() as connection:
        queries.ensure_user(connection, user_id="u")
        older = [
            queries.create_thread(connection, user_id="u", title="t") for _ in range(OLDER_THREADS)
        ]
    older_runs = [new_id() for _ in older]
    last_seq = [0] * OLDER_THREADS
    for start in range(0, stored, FILL_BATCH):
        picks = [(start + i) % OLDER_THREADS for i in range(min(FILL_BATCH, stored - start))]
        seqs = []
        for pick in picks:
            last_seq[pick] += 1
            seqs.append(last_seq[pick])
        batch = rows([older[p] for p in picks], [older_runs[p] for p in picks], seqs)
        with engine.begin() as connection:
            queries.insert_events(connection, batch)

    with engine.begin() as connection:
        conversations = [
            queries.create_thread(connection, user_id="u", title="t") for _ in range(threads)
        ]
    runs = [new_id() for _ in conversations]
    elapsed = 0.0
    for number in range(1, batches + 1):
        batch = rows(conversations, runs, [number] * threads)
        started = time.perf_counter()
        with engine.begin() as connection:
            queries.reserve_seqs(connection, dict.fromkeys(conversations, 1))
            queries.insert_events(connection, batch)
        if number > 5:  # the first batches warm the new threads' pages
            elapsed += time.perf_counter() - started
    engine.dispose()
    return elapsed / ((batches - 5) * threads) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=int, default=300_000)
    parser.add_argument("--threads", type=int, default=200)
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    results = {}
    for name, make in (("random (v4)", random_id), ("time-ordered (v7)", queries.new_id)):
        with tempfile.TemporaryDirectory() as directory:
            results[name] = per_event_us(
                Path(directory), make, args.stored, args.threads, args.batches
            )
        print(f"{name:18s} {results[name]:7.1f} µs per stored event ({args.stored:,} stored)")
    ratio = results["random (v4)"] / results["time-ordered (v7)"]
    print(f"ratio: {ratio:.1f}×")


if __name__ == "__main__":
    main()
