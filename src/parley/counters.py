"""Counts per user (open connections, runs in progress) that forget a user at zero, so the
map does not grow with every user ever seen."""

from __future__ import annotations


class PerUserCounter:
    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def __getitem__(self, user_id: str) -> int:
        return self._counts.get(user_id, 0)

    def add(self, user_id: str) -> None:
        self._counts[user_id] = self._counts.get(user_id, 0) + 1

    def remove(self, user_id: str) -> None:
        left = self._counts.get(user_id, 1) - 1
        if left > 0:
            self._counts[user_id] = left
        else:
            self._counts.pop(user_id, None)
