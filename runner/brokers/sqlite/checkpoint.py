"""Checkpoints of the SQLite broker's WAL, run by a background thread off the commit path.

In WAL mode every commit appends to the ``-wal`` file, and a checkpoint copies those pages into
the database file (with an fsync of each). SQLite runs one itself, in the committing thread,
whenever the WAL passes ``wal_autocheckpoint`` pages (1,000): a commit every few hundred then
takes milliseconds instead of tens of microseconds, while this process holds the broker's one
connection, so every thread waiting to claim or ack waits with it (with four threads on 1 ms
tasks, 10% of the run).

Here a thread with its own connection runs a PASSIVE checkpoint (it never blocks writers or
readers) every ``every_s`` while this process commits. The commit path's own checkpoint stays as
the backstop, and is what lets the WAL start again from its beginning (that needs a checkpoint
that caught up with every commit, which one racing the writers rarely does); it then finds
little left to copy.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger("runner.broker")

#: How long after a commit the next checkpoint runs (more commits meanwhile share it).
CHECKPOINT_EVERY_S = 0.02


class Checkpointer:
    """Checkpoints ``path``'s WAL in a daemon thread after commits; ``close()`` stops it."""

    def __init__(self, path: str, every_s: float = CHECKPOINT_EVERY_S) -> None:
        self.path = path
        self.runs = 0  # checkpoints that ran, and that failed (tests read them)
        self.failures = 0
        self._every_s = every_s
        self._committed = threading.Event()  # a commit since the last checkpoint began
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dq-sqlite-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Note a commit (called after each one, so a plain read first: is_set is cheap)."""
        if not self._committed.is_set():
            self._committed.set()

    def close(self) -> None:
        self._closing.set()
        self._committed.set()
        self._thread.join()

    def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        failing = False
        try:
            # Checked on every pass: a close() landing after ``_closing.wait`` timed out and
            # before ``_committed.clear()`` has its wake-up cleared, and ``_committed.wait()``
            # alone would then wait (and close's join with it) for a commit that never comes.
            while not self._closing.is_set():
                self._committed.wait()
                if self._closing.wait(self._every_s):
                    return
                self._committed.clear()
                try:
                    if conn is None:
                        conn = sqlite3.connect(
                            self.path, isolation_level=None, check_same_thread=False, timeout=0
                        )
                        conn.execute("PRAGMA synchronous = NORMAL")  # fsyncs as the writers'
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.runs += 1
                    failing = False
                except sqlite3.Error as exc:
                    self.failures += 1
                    # The commit path's own checkpoint still runs; say so once per failing spell.
                    if not failing:
                        log.warning(
                            "sqlite broker %s: background checkpoint failed: %s", self.path, exc
                        )
                    failing = True
        finally:
            if conn is not None:
                conn.close()
