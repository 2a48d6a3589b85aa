"""The cancel watch: sets ``ctx.cancelled`` of the running tasks of a cancelled pipeline.

``dq-run cancel`` (or ``Runner.cancel``) sets ``cancel:<root_id>`` in the broker; every settle of
that pipeline's tasks then skips its hand-offs (runner.engine.handoff), and this watch, in each
process, reads the cancelled roots every ``WATCH_S`` while it runs a pipeline's tasks and sets
the cancellation of each one whose root is among them (the handler sees ``ctx.cancelled``; it
is not interrupted). A task of a root it has seen cancelled that is about to start (one this
process had prefetched, so the broker could not dead-letter it) is dead-lettered instead of
run, reason ``cancelled`` (runner.engine.attempt).
"""

from __future__ import annotations

from collections.abc import Sequence

from runner.brokers.base import Broker
from runner.engine.attempt import Attempts
from runner.engine.handoff import CANCEL_PREFIX
from runner.engine.periodic import Periodic

#: How often the cancelled pipelines are read (only while a pipeline task runs here).
WATCH_S = 1.0


class CancelWatch:
    """Reads the cancelled pipelines from its own thread (``start``/``stop``), or once
    (``look``, for tests)."""

    def __init__(self, broker: Broker, attempts: Sequence[Attempts]) -> None:
        self._broker = broker
        self._attempts = attempts
        self._loop = Periodic("dq-cancels", WATCH_S, self.look, "cancelled pipelines not read")

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._loop.stop(timeout)

    def look(self) -> None:
        """Read the cancelled pipelines (while a pipeline task runs here, or some were seen
        last time); tell the running tasks of those, and the attempts about to start."""
        running = [run for a in self._attempts for run in a.runs() if run.root]
        if not running and not any(a.cancelled_roots for a in self._attempts):
            return
        found = self._broker.scan_values(CANCEL_PREFIX)
        roots = frozenset(key[len(CANCEL_PREFIX) :] for key in found)
        for attempts in self._attempts:
            attempts.cancelled_roots = roots
        for run in running:
            if run.root in roots:
                run.cancelled.set()
