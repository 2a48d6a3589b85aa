"""The chaos scenarios' handler: tests/integration/audit_handlers.py's ``work``, plus two faults.

Loaded by the worker processes through ``handler_paths`` (this directory), as
``chaos_handlers:work``. Every run is recorded in the audit dir exactly as ``audit_handlers.work``
records it (a ``start`` line, and an ``end`` line when it returns normally), so
``audit_handlers.read_runs`` reads the ledger back. Two payload keys of its own, acted on right
after the ``start`` line:

- ``raise``: raise a BaseException that is not an Exception: ``"SystemExit"``,
  ``"KeyboardInterrupt"``, or ``"custom"`` (``ChaosError``, a direct BaseException subclass).
- ``exit``: ``os._exit(code)``: the process ends at once, no cleanup, no goodbye to the broker.
- ``block``: sleep this many seconds in one ``time.sleep`` call (a C call: no interrupt lands
  in it), then record the end unless ``ctx.cancelled`` was set meanwhile.
- ``spawn``: start a non-daemon thread that sleeps this many seconds, and leave it running
  (then carry on as ``audit_handlers.work``).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from runner import TaskContext
from tests.integration import audit_handlers

# The audit line format belongs to audit_handlers; its private writer is reused rather than
# copied, so read_runs keeps reading what this module writes.
_record = audit_handlers._record


class ChaosError(BaseException):
    """A handler's own BaseException subclass (not an Exception), as careless code raises."""


_RAISE: dict[str, type[BaseException]] = {
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
    "custom": ChaosError,
}


def work(payload: dict[str, Any], ctx: TaskContext) -> None:
    """Fail as ``raise`` / ``exit`` ask, recording the start first; else audit_handlers.work."""
    if "raise" in payload:
        _record(Path(payload["audit"]), "start", ctx)
        raise _RAISE[payload["raise"]](f"chaos: {payload['raise']} from a handler")
    if "exit" in payload:
        _record(Path(payload["audit"]), "start", ctx)
        os._exit(int(payload["exit"]))
    if "block" in payload:
        _record(Path(payload["audit"]), "start", ctx)
        time.sleep(float(payload["block"]))
        if ctx.cancelled.is_set():
            raise TimeoutError("cancelled")
        _record(Path(payload["audit"]), "end", ctx)
        return
    if "spawn" in payload:
        seconds = float(payload["spawn"])
        threading.Thread(target=time.sleep, args=(seconds,), name="left", daemon=False).start()
    audit_handlers.work(payload, ctx)
