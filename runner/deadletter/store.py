"""The DeadLetterStore protocol: what the memory broker and the CLI need of a store."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from runner.brokers.base import DeadLetterFilter
from runner.model import DeadLetter

if TYPE_CHECKING:
    pass


@runtime_checkable
class DeadLetterStore(Protocol):
    """Keeps dead letters. ``take`` removes and returns records (replay puts their tasks back)."""

    def add(self, record: DeadLetter) -> None:
        """Store one record; durable stores have it on disk when this returns."""

    def add_many(self, records: Sequence[DeadLetter]) -> None:
        """Store several records at once (one flush for the shutdown drain)."""

    def records(self, where: DeadLetterFilter) -> list[DeadLetter]:
        """The records matching ``where``, oldest first."""

    def take(self, ids: Collection[str]) -> list[DeadLetter]:
        """Remove and return every record whose task id is in ``ids``."""

    def purge(self, where: DeadLetterFilter) -> int:
        """Delete the records matching ``where``; return how many were deleted."""

    def count(self) -> int:
        """How many records are stored."""
