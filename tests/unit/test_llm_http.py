"""The model request's retry policy: which waits a provider names are honoured, and how."""

from __future__ import annotations

import email.utils
import time

import pytest

from parley.llm_http import (
    MAX_RETRY_DELAY_S,
    ProviderConnectionError,
    ProviderHTTPError,
    retry_after,
    retry_wait,
)


def refused(status: int, **headers: str) -> ProviderHTTPError:
    named = {name.replace("_", "-"): value for name, value in headers.items()}
    return ProviderHTTPError(status, "http://model.test/v1/chat/completions", named, "")


def test_retry_after_reads_milliseconds_first_then_seconds_then_an_http_date() -> None:
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after({"retry-after": "1.5"}) == 1.5
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert retry_after({"retry-after": in_ten}) == pytest.approx(10, abs=1.5)
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None
    # As the SDK: a number too large for a float is too long a wait; a literal inf names none.
    assert retry_wait(refused(429, retry_after="1e400"), 0) is None
    assert retry_after({"retry-after": "inf"}) is None
    assert retry_wait(refused(429, retry_after="inf"), 0) is not None


def test_only_what_the_sdk_retries_is_retried() -> None:
    for status in (408, 409, 429, 500, 502, 503):
        assert retry_wait(refused(status), 0) is not None, status
    for status in (400, 401, 403, 404, 422):
        assert retry_wait(refused(status), 0) is None, status
    assert retry_wait(refused(400, x_should_retry="true"), 0) is not None
    assert retry_wait(refused(503, x_should_retry="false"), 0) is None
    assert retry_wait(refused(429, retry_after="121"), 0) is None
    assert retry_wait(ProviderConnectionError("refused"), 0) is not None


def test_the_providers_wait_is_used_else_a_jittered_exponential_backoff() -> None:
    assert retry_wait(refused(429, retry_after="7"), 0) == 7.0
    for retries, full in ((0, 0.5), (1, 1.0), (2, 2.0), (10, MAX_RETRY_DELAY_S)):
        waits = {retry_wait(refused(503), retries) for _ in range(50)}
        assert all(w is not None and 0.75 * full <= w <= full for w in waits), (retries, waits)
        assert len(waits) > 1  # jittered
