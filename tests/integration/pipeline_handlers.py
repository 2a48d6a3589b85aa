"""Handlers of the pipeline chaos test (tests/integration/test_pipeline_chaos.py): fetch fans out
to resizes, which join into a report. Every run appends one line (one ``os.write`` on an
``O_APPEND`` file, so a SIGKILL cuts no line in half) to ``<audit>/pipe-<pid>.jsonl``: its type,
id, attempt, lineage headers and, for a report, its payload's values. The audit dir travels in
the payloads and return values.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from runner import TaskContext

#: How many resizes each fetch fans out to.
FANOUT = 10


def fetch(payload: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    _record(payload["audit"], ctx, n=payload["n"])
    items = [{"audit": payload["audit"], "n": payload["n"], "i": i} for i in range(FANOUT)]
    return {"items": items}


def resize(payload: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    _record(payload["audit"], ctx, n=payload["n"], i=payload["i"])
    time.sleep(0.05)  # work to be killed in the middle of
    return {"audit": payload["audit"], "v": f"{payload['n']}:{payload['i']}"}


def report(payload: list[dict[str, Any]], ctx: TaskContext) -> None:
    _record(payload[0]["audit"], ctx, values=[part["v"] for part in payload])


def _record(audit: str, ctx: TaskContext, **fields: Any) -> None:
    line = {
        "type": ctx.type,
        "id": ctx.task_id,
        "attempt": ctx.attempt,
        "root_id": ctx.headers.get("root_id"),
        "parent_id": ctx.headers.get("parent_id"),
        "fanout": ctx.headers.get("fanout"),
        "t": time.time(),
        **fields,
    }
    fd = os.open(Path(audit) / f"pipe-{os.getpid()}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def read_lines(audit: Path) -> list[dict[str, Any]]:
    """Every run recorded, in start order."""
    lines = []
    for path in audit.glob("pipe-*.jsonl"):
        lines.extend(json.loads(t) for t in path.read_text().splitlines() if t.endswith("}"))
    return sorted(lines, key=lambda line: line["t"])
