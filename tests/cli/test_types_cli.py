"""Routing types to processes: `dq-run run CONFIG --types a` (or DQ_TYPES) runs only those types'
tasks in that process, and --until-empty waits only for them; another process runs the rest;
`dq-run stats` shows which running process runs which types."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.cli.run_kit import WAIT_S, run, start, stats_json
from tests.integration.fleet import wait_for

PIPELINE = """
broker: {{kind: sqlite, path: {db}}}
workers: 2
logging: {{format: json, level: INFO}}
task_types:
  resize: {{handler: tests.cli.admin_handlers:record_attempt}}
  report: {{handler: tests.cli.admin_handlers:record_attempt}}
"""


def test_each_process_runs_only_its_types(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text(PIPELINE.format(db=tmp_path / "q.db"))
    done = {name: tmp_path / name for name in ("resize", "report")}
    for name, path in done.items():
        for _ in range(3):
            payload = json.dumps({"done": str(path)})
            assert run("publish", str(config), name, payload).returncode == 0

    resizer = run("run", str(config), "--types", "resize", "--until-empty")
    assert resizer.returncode == 0, resizer.stderr
    assert len(done["resize"].read_text().splitlines()) == 3
    assert not done["report"].exists()  # left for a process that runs it

    reporter = run("run", str(config), "--until-empty", DQ_TYPES="report")
    assert reporter.returncode == 0, reporter.stderr
    assert len(done["report"].read_text().splitlines()) == 3
    started = [json.loads(line) for line in reporter.stderr.splitlines() if line.startswith("{")]
    assert {e["type"] for e in started if e["event"] == "task.started"} == {"report"}


def test_stats_shows_which_process_runs_which_types(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text(PIPELINE.format(db=tmp_path / "q.db"))
    worker = start("run", str(config), "--types", "resize")
    try:
        wait_for(
            lambda: bool(stats_json(str(config))["processes"]),
            WAIT_S,
            what="the worker's presence in stats",
        )
        (entry,) = stats_json(str(config))["processes"]
        assert (entry["pid"], entry["types"]) == (worker.pid, ["resize"])
        assert f":{worker.pid} (resize)" in run("stats", str(config)).stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=WAIT_S)
    assert stats_json(str(config))["processes"] == []  # a process that stops says so
