"""MemoryDeadLetters: dead letters kept in this process (lost with it)."""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from runner.brokers.base import DeadLetterFilter
from runner.model import DeadLetter

if TYPE_CHECKING:
    pass


class MemoryDeadLetters:
    """Dead letters in a list; nothing survives the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[DeadLetter] = []

    def add(self, record: DeadLetter) -> None:
        with self._lock:
            self._records.append(record)

    def add_many(self, records: Sequence[DeadLetter]) -> None:
        with self._lock:
            self._records.extend(records)

    def records(self, where: DeadLetterFilter) -> list[DeadLetter]:
        with self._lock:
            return [r for r in self._records if where.matches(r)]

    def take(self, ids: Collection[str]) -> list[DeadLetter]:
        wanted = frozenset(ids)
        with self._lock:
            taken = [r for r in self._records if r.id in wanted]
            self._records = [r for r in self._records if r.id not in wanted]
        return taken

    def purge(self, where: DeadLetterFilter) -> int:
        with self._lock:
            before = len(self._records)
            self._records = [r for r in self._records if not where.matches(r)]
            return before - len(self._records)

    def count(self) -> int:
        with self._lock:
            return len(self._records)
