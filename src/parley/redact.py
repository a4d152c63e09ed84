"""Keeps credentials out of what the HTTP and WebSocket libraries log.

uvicorn logs every WebSocket handshake with its full path, query string included, and at
DEBUG the `websockets` library logs the request line and headers: a token passed as
`?token=`, in `Authorization: Bearer` or in the `bearer.<jwt>` subprotocol would land in the
log. `RedactingFilter`, installed on the log handlers by `parley serve`, rewrites those
records: query strings become `?[redacted]`, bearer tokens `[redacted]`. Parley's own
structured log lines never carry secrets and are left alone.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
_LIBRARIES = ("uvicorn", "websockets")
# A path followed by a query string: `/ws?token=...` (up to whitespace or a quote).
_QUERY = re.compile(r"(/[^\s?\"']*)\?[^\s\"']*")
# `Bearer <token>` in a header, `bearer.<token>` in the subprotocol list.
_BEARER = re.compile(r"(?i)\b(bearer[ .])[^\s,;\"']+")


def redact(text: str) -> str:
    return _QUERY.sub(rf"\1?{REDACTED}", _BEARER.sub(rf"\1{REDACTED}", text))


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(_LIBRARIES):
            message = record.getMessage()
            redacted = redact(message)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add the filter to every handler of `logger` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(RedactingFilter())
