"""How dq-run run ends when handlers misbehave: threads left running, a handler that kills
its process.

Handlers: tests/cli/exit_handlers.py. Both behaviours are black box: real console script,
real SQLite files (a memory pipeline for the simulate path).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from runner.model import short_id
from tests.cli.exit_handlers import KILL_CODE, LEFT_THREAD
from tests.cli.run_kit import run

SQLITE_PIPELINE = """
broker: {{kind: sqlite, path: {db}, visibility_timeout: 1s}}
workers: 2
retry: {{max_attempts: 5, backoff: {{initial: 10ms, max: 20ms}}}}
logging: {{format: {fmt}, level: INFO}}
task_types:
  work: {{handler: tests.cli.exit_handlers:{handler}, timeout: 500ms}}
dead_letter: {{kind: broker}}
"""

SIMULATED_PIPELINE = """
workers: 2
logging: {format: text, level: INFO}
task_types:
  work: {handler: tests.cli.exit_handlers:leave_thread, timeout: 5s}
simulate:
  tasks: 3
  mix: {work: 1}
"""

#: The left-behind thread sleeps 60 s: a run that waited for it cannot finish within this.
_EXIT_WITHIN_S = 30.0


def _sqlite_config(tmp_path: Path, handler: str, fmt: str = "json") -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(SQLITE_PIPELINE.format(db=tmp_path / "q.db", fmt=fmt, handler=handler))
    return str(path)


def _publish(config: str, payload: str, count: int = 1) -> list[str]:
    ids = []
    for _ in range(count):
        result = run("publish", config, "work", payload)
        assert result.returncode == 0, result.stderr
        ids.append(result.stdout.strip())
    return ids


def _run_bounded(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    try:
        result = run(*args, timeout=_EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"dq-run did not exit within {_EXIT_WITHIN_S}s: it waited for a thread")
    return result, time.monotonic() - t0


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_until_empty_does_not_wait_for_a_thread_a_handler_left(tmp_path: Path) -> None:
    config = _sqlite_config(tmp_path, "leave_thread")
    _publish(config, "{}", count=3)
    summary = tmp_path / "summary.json"
    result, elapsed = _run_bounded("run", config, "--until-empty", "--summary-json", str(summary))
    assert result.returncode == 0, result.stderr
    assert elapsed < _EXIT_WITHIN_S
    assert "Summary" in result.stdout  # printed and flushed before the early exit
    assert json.loads(summary.read_text())["totals"]["succeeded"] == 3
    left = [e for e in _json_lines(result.stderr) if e.get("event") == "process.threads_left"]
    assert len(left) == 1, result.stderr
    assert left[0]["level"] == "WARNING"
    assert left[0]["threads"] == [LEFT_THREAD] * 3
    # Everything of ours was written out first: the worker's last line precedes the warning.
    events = [e.get("event") for e in _json_lines(result.stderr)]
    assert events.index("worker.stopped") < events.index("process.threads_left")
    # Nothing lost on the durable broker: every task was acked before the process left.
    stats = json.loads(run("stats", config, "--json").stdout)
    assert all(t["ready"] + t["delayed"] + t["leased"] == 0 for t in stats["types"].values())
    assert stats["dead_letters"] == 0


def test_simulate_does_not_wait_for_a_thread_a_handler_left(tmp_path: Path) -> None:
    config = tmp_path / "simulated.yaml"
    config.write_text(SIMULATED_PIPELINE)
    result, elapsed = _run_bounded(str(config))
    assert result.returncode == 0, result.stderr
    assert elapsed < _EXIT_WITHIN_S
    assert "Summary" in result.stdout
    warning = [line for line in result.stderr.splitlines() if "process.threads_left" in line]
    assert len(warning) == 1, result.stderr
    assert "WARNING" in warning[0] and LEFT_THREAD in warning[0]


def test_a_run_without_threads_left_warns_of_none(tmp_path: Path) -> None:
    config = _sqlite_config(tmp_path, "exit_process")
    _publish(config, "{}", count=2)
    result, _ = _run_bounded("run", config, "--until-empty")
    assert result.returncode == 0, result.stderr
    assert "process.threads_left" not in result.stderr
    assert sum(e.get("event") == "task.succeeded" for e in _json_lines(result.stderr)) == 2


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_log_names_a_redelivered_task_that_kills_its_process(tmp_path: Path, fmt: str) -> None:
    """The killer's first delivery ends process one (its task.started may be lost: logging is
    asynchronous); its redelivery ends process two, whose log must say it started."""
    config = _sqlite_config(tmp_path, "exit_process", fmt)
    (killer,) = _publish(config, '{"kill": true}')
    first, _ = _run_bounded("run", config, "--until-empty")
    assert first.returncode == KILL_CODE, first.stderr
    # Its lease runs out after visibility_timeout; the second process waits for it (leased
    # tasks are not "empty"), gets it redelivered, and dies of it too.
    second, _ = _run_bounded("run", config, "--until-empty")
    assert second.returncode == KILL_CODE, second.stderr
    if fmt == "json":
        started = [
            e for e in _json_lines(second.stderr)
            if e.get("event") == "task.started" and e.get("task_id") == killer
        ]  # fmt: skip
        assert len(started) == 1, second.stderr
        assert started[0]["attempt"] == 2
    else:
        started = [
            line for line in second.stderr.splitlines()
            if "task.started" in line and short_id(killer) in line
        ]  # fmt: skip
        assert len(started) == 1, second.stderr
        assert "attempt=2" in started[0]
