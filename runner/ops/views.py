"""How ``dq-run dlq``, ``stats`` and ``trace`` show their data: plain text tables and JSON objects.

Pure functions from records to strings or JSON-ready dicts, so the CLI only prints.
Times are shown in UTC (``2024-05-01T12:00:00Z``); ages as ``950ms``, ``12.3s``, ``4m05s``.
Tables fit ``width`` (default: the terminal's; no limit when stdout is not a terminal): columns
drop or shrink, and cut text ends in an ellipsis (runner.observe.tablefit).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from runner.brokers.flow import rate_text
from runner.model import DeadLetter, short_id
from runner.observe.tablefit import Column, elide, plain_table
from runner.ops.admin import Stats
from runner.ops.pipelines import TraceNode

#: The ERROR column quotes at most this many characters of the message.
_MESSAGE_CHARS = 60


def utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)) if epoch else "-"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _short(text: str) -> str:
    first = text.splitlines()[0] if text else ""
    return elide(first, _MESSAGE_CHARS)


def table_width(width: int | None) -> int | None:
    """``width``, else the terminal's (or ``$COLUMNS``); None (no limit) when stdout is a pipe
    or a file: a script reading the table gets every column whole."""
    if width is not None:
        return width
    isatty = getattr(sys.stdout, "isatty", None)
    if "COLUMNS" in os.environ or (callable(isatty) and isatty()):
        return shutil.get_terminal_size().columns
    return None


_DEAD_LETTER_COLUMNS = (
    Column("ID"),
    Column("TYPE", flexible=True, min_width=6),
    Column("ATTEMPTS", rank=1),
    Column("REASON", flexible=True, min_width=8),
    Column("ERROR", flexible=True, min_width=24),
    Column("DEAD_AT", rank=2),  # `dq-run dlq show` and --json have it; the error matters more
)


def dead_letter_table(records: Sequence[DeadLetter], width: int | None = None) -> str:
    rows = [
        (
            short_id(r.id),
            r.task.type,
            str(r.attempts),
            r.reason,
            _short(f"{r.error_type}: {r.message}" if r.message else r.error_type),
            utc(r.dead_at),
        )
        for r in records
    ]
    return plain_table(_DEAD_LETTER_COLUMNS, rows, table_width(width))


def dead_letter_summary(record: DeadLetter) -> dict[str, Any]:
    """One ``dq-run dlq list --json`` line: what the table shows, untruncated, plus the payload."""
    return {
        "id": record.id,
        "type": record.task.type,
        "attempts": record.attempts,
        "reason": record.reason,
        "error_type": record.error_type,
        "message": record.message,
        "dead_at": record.dead_at,
        "payload": record.task.payload,
        **_lineage(record),
    }


def _lineage(record: DeadLetter) -> dict[str, Any]:
    """A pipeline's task's root_id and parent_id; nothing for a task no other started."""
    headers = record.task.headers
    if "root_id" not in headers:
        return {}
    return {"root_id": headers["root_id"], "parent_id": headers.get("parent_id")}


def dead_letter_detail(record: DeadLetter) -> str:
    """Everything ``dq-run dlq show`` prints: the record, each attempt's error and traceback."""
    task = record.task
    out = [
        f"id:          {record.id}",
        f"type:        {task.type}",
        f"reason:      {record.reason}",
        f"attempts:    {record.attempts}",
        f"enqueued_at: {utc(task.enqueued_at)}",
        f"dead_at:     {utc(record.dead_at)}",
        f"payload:     {json.dumps(task.payload, ensure_ascii=False)}",
    ]
    if "root_id" in task.headers:  # a pipeline's task: where it came from (dq-run trace)
        out[2:2] = [
            f"root_id:     {task.headers['root_id']}",
            f"parent_id:   {task.headers.get('parent_id')}",
        ]
    for attempt in task.history:
        out += [
            "",
            f"--- attempt {attempt.attempt} at {utc(attempt.started_at)} on {attempt.worker or '?'}"
            f" ({age(attempt.duration_s)}): {attempt.error_type}: {attempt.message}",
        ]
        if attempt.traceback:
            out.append(attempt.traceback.rstrip())
    last = task.history[-1] if task.history else None
    out += ["", f"--- final error ({record.reason}): {record.error_type}: {record.message}"]
    if record.traceback and (last is None or last.traceback != record.traceback):
        out.append(record.traceback.rstrip())
    elif record.traceback:
        out.append(f"(traceback as in attempt {last.attempt if last else '?'})")
    return "\n".join(out)


def stats_table(stats: Stats, width: int | None = None) -> str:
    rows = [
        (
            name,
            str(s.depth.ready),
            str(s.depth.delayed),
            str(s.depth.leased),
            age(s.oldest_age_s),
        )
        for name, s in stats.types.items()
    ]
    return "\n".join(
        [
            plain_table(
                (
                    Column("TYPE", flexible=True, min_width=6),
                    *(Column(h) for h in ("READY", "DELAYED", "LEASED", "OLDEST")),
                ),
                rows,
                table_width(width),
            ),
            "",
            f"dead letters: {stats.dead_letters}",
            f"oldest task:  {age(stats.oldest_age_s)}",
            *([f"paused:       {paused_list(stats.paused)}"] if stats.paused else []),
            *([f"rate limits:  {rate_list(stats)}"] if stats.rate_limits else []),
            *([f"circuits:     {circuit_list(stats)}"] if stats.circuits else []),
            *([f"unique keys:  {held_list(stats)}"] if stats.unique_held else []),
            *([f"processes:    {process_list(stats)}"] if stats.processes else []),
        ]
    )


def rate_list(stats: Stats) -> str:
    """``email 50/s (burst 50, 3.2 tokens, held back 12.5s)``, for each rate-limited type."""
    return ", ".join(
        f"{name} {rate_text(limit.rate)} (burst {limit.burst:g}, {bucket.tokens:.1f} tokens, held "
        f"back {age(bucket.limited_s)})"
        for name, (limit, bucket) in sorted(stats.rate_limits.items())
    )


def paused_list(paused: dict[str, float | None]) -> str:
    """``email (until resumed), report (until 2026-12-04 18:00:00Z)``."""
    return ", ".join(
        f"{name} (until {'resumed' if until is None else utc(until)})"
        for name, until in sorted(paused.items())
    )


def circuit_list(stats: Stats) -> str:
    """``payment open since 2026-12-04T18:00:00Z, email closed``."""
    return ", ".join(
        f"{name} {circuit.state.replace('_', '-')}"
        + (f" since {utc(circuit.since)}" if circuit.state != "closed" else "")
        for name, circuit in sorted(stats.circuits.items())
    )


def held_list(stats: Stats) -> str:
    """``sync 3 held, report 0 held``: each unique type's keys held now."""
    return ", ".join(f"{name} {count} held" for name, count in sorted(stats.unique_held.items()))


def process_list(stats: Stats) -> str:
    """``web-1:4242 (email, report), web-2:17 (resize)``: who runs which types now."""
    return ", ".join(
        f"{p.get('host')}:{p.get('pid')} ({', '.join(p.get('types') or ())})"
        for p in stats.processes
    )


def trace_tree(roots: Sequence[TraceNode]) -> str:
    """``dq-run trace``: one line per task, indented under its parent."""
    lines: list[str] = []

    def walk(node: TraceNode, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("`- " if last else "|- ")
        took = f" {age(node.duration_s)}" if node.duration_s is not None else ""
        error = f"  {_short(node.error)}" if node.error else ""
        lines.append(
            f"{prefix}{branch}{node.type} {short_id(node.id)} {node.state} "
            f"attempts={node.attempts}{took}{error}"
        )
        inner = prefix if top else prefix + ("   " if last else "|  ")
        for index, child in enumerate(node.children):
            walk(child, inner, index == len(node.children) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return "\n".join(lines)
