"""A handler that keeps an audit trail, for tests running real `dq-run run` processes.

Every run appends a ``start`` line and, if the handler returns normally, an ``end`` line to
``<audit dir>/<pid>.jsonl``: task id, attempt, pid and wall-clock time. The audit dir is
``payload["audit"]``, else the ``AUDIT_TEST_DIR`` environment variable (not ``DQ_*``: those are
config overrides). Each line is one ``os.write`` on an ``O_APPEND`` file, so lines from several
threads never interleave and a line written just before a SIGKILL is on disk. The test process
reads the files back with ``read_runs`` and audits what happened: who ran what, when, how often,
and whether two runs of one task ever overlapped.

Payload keys (all optional but the audit dir):

- ``until``: first wait until the file at this path exists (looked for every 50 ms), cut short
  by ``ctx.cancelled``: the test decides when the handler returns, not a guess at its speed.
- ``sleep``: seconds of "work" (default 0), cut short by ``ctx.cancelled``.
- ``hold_first``: on attempt 1 only, first hold the task this long in 50 ms ``time.sleep``
  slices, so a test can SIGSTOP the process while it runs handler code (not while it writes).
  The slices keep running after a SIGCONT, so the watchdog's interrupt lands in this loop.
- ``fail``: raise RuntimeError while ``ctx.attempt <= fail``.
- ``suicide``: SIGKILL this worker process right after recording the start.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner import TaskContext

AUDIT_ENV = "AUDIT_TEST_DIR"
_SLICE_S = 0.05


def work(payload: dict[str, Any], ctx: TaskContext) -> None:
    """Record a start, act on the payload keys above, record an end if nothing stopped it."""
    audit = Path(payload.get("audit") or os.environ[AUDIT_ENV])
    _record(audit, "start", ctx)
    if payload.get("suicide"):
        os.kill(os.getpid(), signal.SIGKILL)
    hold = float(payload.get("hold_first", 0.0)) if ctx.attempt == 1 else 0.0
    for _ in range(round(hold / _SLICE_S)):
        time.sleep(_SLICE_S)  # slices, not one call: an interrupt lands between them
    until = payload.get("until")
    while until and not Path(until).exists() and not ctx.cancelled.wait(_SLICE_S):
        pass
    sleep = float(payload.get("sleep", 0.0))
    if sleep > 0:
        ctx.cancelled.wait(sleep)
    if ctx.cancelled.is_set():
        raise TimeoutError("cancelled")
    if ctx.attempt <= int(payload.get("fail", 0)):
        raise RuntimeError(f"failing attempt {ctx.attempt} on purpose")
    _record(audit, "end", ctx)


def tick(payload: dict[str, Any], ctx: TaskContext) -> None:
    """A schedule's task: record which tick published it (its headers) and the task id, to
    ``<audit>/ticks-<pid>.jsonl`` (read back with ``read_ticks``)."""
    line = {"tick": ctx.headers.get("tick"), "id": ctx.task_id, "pid": os.getpid()}
    _append(Path(payload["audit"]) / f"ticks-{os.getpid()}.jsonl", line)


def read_ticks(audit: Path) -> dict[str, set[str]]:
    """Tick name -> the ids of the tasks recorded for it (one run or more each)."""
    found: dict[str, set[str]] = {}
    for path in audit.glob("ticks-*.jsonl"):
        for text in path.read_text().splitlines():
            if text.endswith("}"):  # not a line cut by a kill
                line = json.loads(text)
                found.setdefault(line["tick"], set()).add(line["id"])
    return found


def _append(path: Path, line: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def _record(audit: Path, event: str, ctx: TaskContext) -> None:
    line = {
        "event": event,
        "id": ctx.task_id,
        "attempt": ctx.attempt,
        "pid": os.getpid(),
        "t": time.time(),
    }
    _append(audit / f"{os.getpid()}.jsonl", line)


@dataclass(frozen=True)
class Run:
    """One handler run: ``end`` is None when it never returned normally (killed, failed)."""

    id: str
    attempt: int
    pid: int
    start: float
    end: float | None


def read_runs(audit: Path) -> list[Run]:
    """Every run recorded under ``audit``, in start order."""
    starts: dict[tuple[str, int, int], float] = {}
    ends: dict[tuple[str, int, int], float] = {}
    for path in audit.glob("[0-9]*.jsonl"):
        for text in path.read_text().splitlines():
            if not text.endswith("}"):
                continue  # a line cut by a kill
            line = json.loads(text)
            key = (line["id"], line["attempt"], line["pid"])
            (starts if line["event"] == "start" else ends)[key] = line["t"]
    runs = [Run(i, a, p, t, ends.get((i, a, p))) for (i, a, p), t in starts.items()]
    return sorted(runs, key=lambda r: r.start)


def completed(runs: list[Run]) -> Counter[str]:
    """Task id -> how many runs of it returned."""
    return Counter(r.id for r in runs if r.end is not None)


def overlaps(runs: list[Run], open_until: float | None = None) -> list[tuple[Run, Run]]:
    """Pairs of runs of one task that overlapped in time.

    A run that never returned lasts until ``open_until`` (when its worker was killed, say), or
    forever when that is None.
    """
    forever = float("inf") if open_until is None else open_until
    by_id: dict[str, list[Run]] = {}
    for run in runs:
        by_id.setdefault(run.id, []).append(run)
    found = []
    for same in by_id.values():
        latest: Run | None = None  # the earlier run that ends last
        for run in same:
            if latest is not None and run.start < _end(latest, forever):
                found.append((latest, run))
            if latest is None or _end(run, forever) > _end(latest, forever):
                latest = run
    return found


def _end(run: Run, open_until: float) -> float:
    return run.end if run.end is not None else open_until


def fail_until(payload: dict[str, Any], ctx: TaskContext) -> None:
    """Record a start; fail (a downstream that is down) until the file ``payload["until"]``
    exists, then record an end."""
    audit = Path(payload["audit"])
    _record(audit, "start", ctx)
    if not Path(payload["until"]).exists():
        raise ConnectionError("downstream down")
    _record(audit, "end", ctx)
