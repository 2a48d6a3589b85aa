"""dq-run pause / resume as a black box: a running worker process on a real SQLite file stops
being handed one type's tasks (they stay ready, no attempt used) while another type runs on,
and takes them up again on resume or when a timed pause runs out."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cli.run_kit import WAIT_S, run, start, stats_json

PIPELINE = """
broker: {{kind: sqlite, path: {db}}}
workers: 2
logging: {{format: json, level: WARNING}}
task_types:
  report: {{handler: tests.cli.admin_handlers:record_attempt}}
  email:  {{handler: tests.cli.admin_handlers:record_attempt}}
"""


def _config(tmp_path: Path) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(db=tmp_path / "q.db"))
    return str(path)


def _publish(config: str, type_name: str, done: Path, n: int) -> None:
    for _ in range(n):
        result = run("publish", config, type_name, json.dumps({"done": str(done)}))
        assert result.returncode == 0, result.stderr


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _wait(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_paused_type_waits_unstarted_while_others_run_then_resumes(tmp_path: Path) -> None:
    config = _config(tmp_path)
    reports, emails = tmp_path / "reports", tmp_path / "emails"
    paused = run("pause", config, "report")
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.strip() == "paused: report (until resumed)"
    stats = stats_json(config)["types"]
    assert stats["report"]["paused"] is True and stats["report"]["paused_until"] is None
    assert stats["email"]["paused"] is False
    assert "paused:       report (until resumed)" in run("stats", config).stdout

    worker = start("run", config, "--no-simulate")
    try:
        _publish(config, "report", reports, 3)
        _publish(config, "email", emails, 3)
        _wait(lambda: len(_lines(emails)) == 3, "the unpaused type to run")
        time.sleep(0.5)  # a paused type would have been handed out by now (it only aims)
        assert _lines(reports) == []
        assert stats_json(config)["types"]["report"]["ready"] == 3  # held back, not leased

        resumed = run("resume", config, "report")
        assert (resumed.returncode, resumed.stdout.strip()) == (0, "resumed: report")
        _wait(lambda: len(_lines(reports)) == 3, "the resumed type to run")
        # Held back inside the broker's claim: no attempt was used while paused.
        assert [line.split()[1] for line in _lines(reports)] == ["1", "1", "1"]
        assert run("resume", config, "report").stdout.strip() == "report was not paused"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=WAIT_S)
    assert worker.returncode == 0


def test_a_timed_pause_ends_by_itself(tmp_path: Path) -> None:
    config = _config(tmp_path)
    reports = tmp_path / "reports"
    before = time.time()
    paused = run("pause", config, "report", "--for", "2s")
    after = time.time()
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.startswith("paused: report (until 20")
    until = stats_json(config)["types"]["report"]["paused_until"]
    assert before + 2 <= until <= after + 2  # 2 s from when the pause command ran
    _publish(config, "report", reports, 1)

    result = run("run", config, "--until-empty", "--no-simulate")
    assert result.returncode == 0, result.stderr
    assert time.time() >= until - 0.05  # it waited for the pause to end, then ran the task
    assert [line.split()[1] for line in _lines(reports)] == ["1"]
    assert stats_json(config)["types"]["report"]["paused"] is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pause", "{config}", "reprot"], "unknown task type 'reprot' (known: email, report)"),
        (["resume", "{config}", "nope"], "unknown task type 'nope'"),
        (["pause", "{config}", "report", "--for", "soon"], "--for 'soon': expected a duration"),
    ],
)
def test_bad_pause_arguments_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    config = _config(tmp_path)
    result = run(*(a.format(config=config) for a in args))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_memory_broker_cannot_be_paused_from_outside(tmp_path: Path) -> None:
    path = tmp_path / "memory.yaml"
    path.write_text(PIPELINE.format(db="x").replace("{kind: sqlite, path: x}", "{kind: memory}"))
    result = run("pause", str(path), "report")
    assert result.returncode == 2
    assert "cannot pause: a memory broker lives inside the one dq-run process" in result.stderr
    assert "Runner.pause" in result.stderr
