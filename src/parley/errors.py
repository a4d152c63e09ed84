"""Parley's error hierarchy. Each error carries a protocol `code` and whether a retry can help.

Errors are raised with a code anywhere inside; they become protocol `error` frames or
`agent_error` events at one place each (the transport and the supervisor).
"""

from __future__ import annotations


class ParleyError(Exception):
    code: str = "internal_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable


class NotFound(ParleyError):
    """The thing does not exist *for this user*; never says whether it exists for another."""

    code = "not_found"


class InvalidMessage(ParleyError):
    code = "invalid_message"


class RateLimited(ParleyError):
    code = "rate_limited"
    retryable = True


class ServerBusy(ParleyError):
    code = "server_busy"
    retryable = True


class Unavailable(ParleyError):
    code = "unavailable"
    retryable = True


class Unauthorized(ParleyError):
    code = "unauthorized"


class LLMUnavailable(ParleyError):
    """The language model provider is down, overloaded or its circuit is open."""

    code = "llm_unavailable"
    retryable = True


class LLMError(ParleyError):
    """The provider refused the request (bad key, unknown model): retrying will not help."""

    code = "llm_error"


class StorageUnavailable(ParleyError):
    """The database stayed unreachable for longer than `DATABASE_OUTAGE_GRACE_S` (or too much
    was waiting for it): what the run produced since could not be stored. Asking again once the
    database is back works."""

    code = "storage_unavailable"
    retryable = True
