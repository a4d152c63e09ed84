"""A circuit breaker for one LLM provider: closed → open after N consecutive failures →
half-open after a cool-down, where one trial request decides whether it closes again.

Written here instead of using `purgatory` because Parley needs the state synchronously for
readiness and metrics, and needs to wrap a *streamed* response whose failure can arrive after
the call returned; purgatory's decorator/context-manager API with its own state store covers
neither without reaching into its internals. This module is the whole of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpenError(Exception):
    def __init__(self, name: str, retry_in_s: float) -> None:
        super().__init__(f"circuit for {name} is open; retry in {retry_in_s:.0f}s")
        self.retry_in_s = retry_in_s


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int,
        reset_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        self.name = name
        self._threshold = failure_threshold
        self._reset_after_s = reset_after_s
        self._clock = clock
        self._on_change = on_change
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._cooled_down():
            return CircuitState.HALF_OPEN
        return self._state

    def before_call(self) -> None:
        """Raises `CircuitOpenError` when a call must not be made now."""
        if self._state is CircuitState.CLOSED:
            return
        if self._state is CircuitState.OPEN:
            if not self._cooled_down():
                remaining = self._reset_after_s - (self._clock() - self._opened_at)
                raise CircuitOpenError(self.name, remaining)
            self._set(CircuitState.HALF_OPEN)
        if self._trial_in_flight:
            raise CircuitOpenError(self.name, 1.0)
        self._trial_in_flight = True

    def record_success(self) -> None:
        self._failures = 0
        self._trial_in_flight = False
        if self._state is not CircuitState.CLOSED:
            self._set(CircuitState.CLOSED)

    def record_failure(self) -> None:
        self._trial_in_flight = False
        self._failures += 1
        if self._state is CircuitState.HALF_OPEN or self._failures >= self._threshold:
            self._opened_at = self._clock()
            self._set(CircuitState.OPEN)

    def release(self) -> None:
        """A call ended without telling anything about the provider (e.g. it was cancelled)."""
        self._trial_in_flight = False

    def _cooled_down(self) -> bool:
        return self._clock() - self._opened_at >= self._reset_after_s

    def _set(self, state: CircuitState) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state)
