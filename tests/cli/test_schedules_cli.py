"""Schedules from the outside: a `dq-run run` process on a SQLite file fires a schedule's ticks
(each task carries its schedule and tick in its headers), logs and counts them, and
`dq-run schedules` reads the last fired tick from the broker while it runs."""

from __future__ import annotations

import json
import signal
from datetime import datetime
from pathlib import Path

from runner.engine.schedule import tick_name
from tests.cli.run_kit import REPO, WAIT_S, run, start
from tests.integration.fleet import wait_for

PIPELINE = """
broker: {{kind: sqlite, path: {db}}}
workers: 2
logging: {{format: json, level: INFO}}
task_types:
  beat: {{handler: tests.cli.admin_handlers:record_headers}}
  report: {{handler: tests.cli.admin_handlers:record_headers}}
schedules:
  fast: {{type: beat, every: 200ms, payload: {{done: "{done}"}}}}
  nightly: {{type: report, cron: "0 3 * * *", timezone: Europe/Berlin, missed: skip}}
"""


def _config(tmp_path: Path) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(db=tmp_path / "q.db", done=tmp_path / "done"))
    return str(path)


def test_a_running_worker_fires_ticks_and_schedules_shows_them(tmp_path: Path) -> None:
    config = _config(tmp_path)
    done = tmp_path / "done"
    before = run("schedules", config)
    assert before.returncode == 0, before.stderr
    assert "fast      beat    every 0.2s" in before.stdout
    assert "never" in before.stdout

    worker = start("run", config)
    try:
        wait_for(
            lambda: done.exists() and len(done.read_text().splitlines()) >= 3,
            WAIT_S,
            what="three ticks",
        )
        shown = run("schedules", config, "--json")
        assert shown.returncode == 0, shown.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=WAIT_S)
    fired = [e for e in map(json.loads, stderr.splitlines()) if e["event"] == "schedule.fired"]

    records = [json.loads(line) for line in done.read_text().splitlines()]
    ticks = [r["headers"]["tick"] for r in records]
    assert all(r["headers"]["schedule"] == "fast" for r in records)
    assert len(set(ticks)) == len(ticks)  # one task per tick
    stamps = [datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() for t in ticks]
    assert all(round(s * 1000) % 200 == 0 for s in stamps)  # multiples of 200 ms
    assert [e["tick"] for e in fired][: len(ticks)] == ticks
    assert all(e["schedule"] == "fast" and e["lag_ms"] >= 0 for e in fired)

    states = {s["name"]: s for s in map(json.loads, shown.stdout.splitlines())}
    assert states["fast"]["last_fired"] is not None
    assert tick_name(states["fast"]["last_fired"]) in ticks + [e["tick"] for e in fired]
    assert states["nightly"]["cron"] == "0 3 * * *"
    assert states["nightly"]["timezone"] == "Europe/Berlin"
    # A new schedule fires nothing in the past: its latest tick is marked, not fired.
    assert states["nightly"]["last_fired"] is not None and states["nightly"]["due"] is False
    assert not any(r["headers"]["schedule"] == "nightly" for r in records)


def test_schedules_on_a_memory_broker_shows_next_ticks_only() -> None:
    config = str(REPO / "tests" / "cli" / "memory_schedules.yaml")
    result = run("schedules", config)
    assert result.returncode == 0, result.stderr
    assert "every 30s" in result.stdout
    assert "(the memory broker keeps last fired ticks inside the running process)" in result.stdout
