"""A dead-letter file whose shutdown writes are slow and announced: a test sends its second
signal while the stop is writing them (tests/cli/test_screen_cli.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from runner.deadletter.file import FileDeadLetters
from runner.model import DeadLetter

#: The line written to stderr as a write of records begins.
WRITING = "slow dead letters: writing"


class SlowDeadLetters(FileDeadLetters):
    """A FileDeadLetters that says on stderr when it begins to write records, then takes
    ``pause_s`` longer to write them."""

    def __init__(self, path: str | Path, pause_s: float) -> None:
        super().__init__(path)
        self.pause_s = pause_s

    def add_many(self, records: Sequence[DeadLetter]) -> None:
        os.write(2, f"{WRITING} {len(records)}\n".encode())
        time.sleep(self.pause_s)
        super().add_many(records)
