"""Structured logs and Prometheus metrics.

`get_logger(name).info("run.completed", run_id=..., duration_ms=...)` writes one JSON object a
line in staging/production and `event key=value` lines in development. It is a thin layer on
the standard library's logging, written here rather than adding structlog because this is all
the API Parley uses. Message contents and secrets are never passed as fields.

`Metrics` owns its own `CollectorRegistry`, so two apps in one process (tests) never collide.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class StructLogger:
    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, exc_info=exc_info, extra={"fields": fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, False, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, True, fields)


def get_logger(name: str) -> StructLogger:
    return StructLogger(logging.getLogger(name))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        pairs = " ".join(f"{key}={value}" for key, value in fields.items())
        line = f"{record.levelname:<7} {record.getMessage()} {pairs}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(*, level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log duplicates what Parley logs, one line per health probe.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # stamina announces each retry itself; startup records attempts in its phase table instead.
    logging.getLogger("stamina").setLevel(logging.ERROR)
    for noisy in ("httpx", "httpx2", "httpcore", "openai", "aiosqlite", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.runs = Counter("parley_runs", "Runs by outcome", ["outcome"], registry=r)
        self.run_seconds = Histogram(
            "parley_run_seconds", "Run latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.runs_active = Gauge("parley_runs_active", "Runs in progress", registry=r)
        self.llm_seconds = Histogram(
            "parley_llm_request_seconds",
            "LLM request latency",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_failures = Counter(
            "parley_llm_failures", "LLM requests that failed", ["kind"], registry=r
        )
        self.circuit_open = Gauge(
            "parley_llm_circuit_open", "1 when the LLM circuit is open", ["provider"], registry=r
        )
        self.llm_probe_seconds = Histogram(
            "parley_llm_probe_seconds",
            "LLM readiness probe latency",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_probe_failures = Counter(
            "parley_llm_probe_failures", "LLM readiness probes that failed", ["kind"], registry=r
        )
        self.llm_probe_up = Gauge(
            "parley_llm_probe_up", "1 when the last LLM readiness probe passed", registry=r
        )
        self.local_model_restarts = Counter(
            "parley_local_model_restarts", "Restarts of the local model process", registry=r
        )
        self.tool_seconds = Histogram(
            "parley_tool_seconds",
            "Tool latency",
            ["tool", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.connections = Gauge(
            "parley_connections_open", "Open WebSocket connections", registry=r
        )
        self.send_queue_overflows = Counter(
            "parley_send_queue_overflows", "Connections closed for falling behind", registry=r
        )
        self.eventlog_queue_depth = Gauge(
            "parley_eventlog_queue_depth", "Events waiting to be persisted", registry=r
        )
        self.eventlog_batch_size = Histogram(
            "parley_eventlog_batch_size",
            "Events per commit",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 512),
            registry=r,
        )
        self.eventlog_commit_seconds = Histogram(
            "parley_eventlog_commit_seconds",
            "Event batch commit latency",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.database_outage = Gauge(
            "parley_database_outage",
            "1 while the event log cannot reach the database and retries",
            registry=r,
        )
        self.eventlog_backlog = Gauge(
            "parley_eventlog_backlog",
            "Events and run ends held in memory while the database is unreachable",
            registry=r,
        )
        self.eventlog_retries = Counter(
            "parley_eventlog_retries",
            "Event batch commits retried after a database error",
            registry=r,
        )
        self.eventlog_refused = Counter(
            "parley_eventlog_refused",
            "Events not stored because the database outage outlasted the grace or the backlog",
            ["reason"],
            registry=r,
        )
        self.supervisor_accepting = Gauge(
            "parley_supervisor_accepting", "1 while the supervisor accepts runs", registry=r
        )
        self.rejections = Counter(
            "parley_rejections", "Client messages refused", ["code"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
