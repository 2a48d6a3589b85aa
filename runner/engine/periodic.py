"""A background thread that does one broker step every few seconds until stopped.

The circuit watch and the presence entry are each one such loop: the first step may come at
once or after the first interval, a closed broker ends the loop, and any other broker error
is logged at DEBUG and the next step tries again (a step is a refresh, never the only chance).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from runner.errors import BrokerClosed, BrokerError

log = logging.getLogger("runner.worker")


class Periodic:
    """Calls ``step`` every ``every_s`` seconds from a daemon thread named ``name``."""

    def __init__(self, name: str, every_s: float, step: Callable[[], None], what: str) -> None:
        self._name = name
        self._every_s = every_s
        self._step = step
        self._what = what  # said when a step fails: "circuits not read"
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the loop and wait for it; False when it was never started."""
        self._stopping.set()
        if self._thread is None:
            return False
        self._thread.join(timeout)
        return True

    def _run(self) -> None:
        while not self._stopping.wait(self._every_s):
            try:
                self._step()
            except BrokerClosed:
                return
            except BrokerError as exc:  # the next step tries again
                log.debug("%s: %s", self._what, exc)
