"""The circuit breaker, driven by a fake clock."""

from __future__ import annotations

import pytest

from parley.circuit import CircuitBreaker, CircuitOpenError, CircuitState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, changes: list[CircuitState]) -> CircuitBreaker:
    return CircuitBreaker(
        "p", failure_threshold=3, reset_after_s=10, clock=clock, on_change=changes.append
    )


def test_opens_after_consecutive_failures_and_refuses_calls() -> None:
    clock, changes = Clock(), []
    b = breaker(clock, changes)
    for _ in range(2):
        b.before_call()
        b.record_failure()
    assert b.state is CircuitState.CLOSED
    b.before_call()
    b.record_failure()
    assert b.state is CircuitState.OPEN
    assert changes == [CircuitState.OPEN]
    with pytest.raises(CircuitOpenError):
        b.before_call()


def test_a_success_resets_the_failure_count() -> None:
    b = breaker(Clock(), [])
    for _ in range(2):
        b.record_failure()
    b.record_success()
    for _ in range(2):
        b.record_failure()
    assert b.state is CircuitState.CLOSED


def test_half_open_allows_one_trial_which_closes_or_reopens() -> None:
    clock, changes = Clock(), []
    b = breaker(clock, changes)
    for _ in range(3):
        b.record_failure()
    clock.now += 10
    assert b.state is CircuitState.HALF_OPEN
    b.before_call()
    with pytest.raises(CircuitOpenError):
        b.before_call()  # only one trial at a time
    b.record_failure()
    assert b.state is CircuitState.OPEN
    clock.now += 10
    b.before_call()
    b.record_success()
    assert b.state is CircuitState.CLOSED
    assert changes == [
        CircuitState.OPEN,
        CircuitState.HALF_OPEN,
        CircuitState.OPEN,
        CircuitState.HALF_OPEN,
        CircuitState.CLOSED,
    ]


def test_a_released_trial_lets_the_next_call_try() -> None:
    clock = Clock()
    b = breaker(clock, [])
    for _ in range(3):
        b.record_failure()
    clock.now += 10
    b.before_call()
    with pytest.raises(CircuitOpenError):
        b.before_call()  # the trial is still out
    b.release()
    b.before_call()  # released without an outcome: the next call may try
    assert b.state is CircuitState.HALF_OPEN
