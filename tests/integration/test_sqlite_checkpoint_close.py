"""Checkpointer.close() ends its thread even when it lands while a checkpoint is being started.

Found as a rare hang in the contract suite's teardown (SqliteBroker.close joins this thread).
"""

from __future__ import annotations

import threading
from pathlib import Path

from runner.brokers.sqlite.checkpoint import Checkpointer


class CloseInTheWindow(threading.Event):
    """A ``_closing`` event whose first timed-out wait is followed at once by what close()
    does before its join (set ``_closing``, set ``_committed``): close() landing after the
    loop saw no close and before it cleared ``_committed``."""

    def __init__(self, committed: threading.Event) -> None:
        super().__init__()
        self.committed = committed
        self.landed = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if self.landed.is_set():
            return super().wait(timeout)
        result = super().wait(timeout)
        self.set()
        self.committed.set()
        self.landed.set()
        return result


def test_close_landing_as_a_checkpoint_begins_still_ends_the_thread(tmp_path: Path) -> None:
    checkpoints = Checkpointer(str(tmp_path / "queue.db"), every_s=0.001)
    window = CloseInTheWindow(checkpoints._committed)
    checkpoints._closing = window
    checkpoints.committed()
    assert window.landed.wait(5)
    checkpoints._thread.join(5)  # close() has "set" both events; all it has left is the join
    assert not checkpoints._thread.is_alive()
