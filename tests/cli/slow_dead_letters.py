"""A dead-letter file whose writes and takes are slow and announced: a test sends its second
signal while the stop writes records, or while a replay takes them
(tests/cli/test_screen_cli.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from runner.deadletter.file import FileDeadLetters
from runner.model import DeadLetter

#: The lines written to stderr as a write of records begins, and a take.
WRITING = "slow dead letters: writing"
TAKING = "slow dead letters: taking"


class SlowDeadLetters(FileDeadLetters):
    """A FileDeadLetters that says on stderr when it begins to write or take records, then
    takes ``pause_s`` longer to do it."""

    def __init__(self, path: str | Path, pause_s: float) -> None:
        super().__init__(path)
        self.pause_s = pause_s

    def add_many(self, records: Sequence[DeadLetter]) -> None:
        os.write(2, f"{WRITING} {len(records)}\n".encode())
        time.sleep(self.pause_s)
        super().add_many(records)

    def take(self, ids: Collection[str]) -> list[DeadLetter]:
        os.write(2, f"{TAKING} {len(ids)}\n".encode())
        time.sleep(self.pause_s)
        return super().take(ids)
