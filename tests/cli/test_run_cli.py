"""dq-run run as a black box: the demo, simulation, summary JSON, signals and exit codes."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.cli.run_kit import REPO, Lines, run, start

SLOW_PIPELINE = """
workers: 2
shutdown: {grace: 5s}
logging: {format: json}
task_types:
  work: {handler: handlers.demo:send_email, concurrency: 2, timeout: 5s}
simulate:
  tasks: 40
  mix: {work: 1}
  faults:
    work: {latency: [300ms, 400ms]}
"""


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _wait_mid_run(err: Lines) -> None:
    """Until the log shows a few tasks done, two running (the rest queued)."""

    def mid_run() -> bool:
        done = err.count("task.succeeded")
        return done >= 2 and err.count("task.started") - done == 2

    err.wait_until(mid_run, "a few tasks done and two running")


def test_demo_config_runs_to_completion_with_a_summary(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    result = run("configs/demo.yaml", "--summary-json", str(summary), TASKS="30", WORKERS="4")
    assert result.returncode == 0, result.stderr
    assert "Summary" in result.stdout
    data = json.loads(summary.read_text())
    totals = data["totals"]
    assert totals["published"] == 30
    assert totals["succeeded"] + totals["dead"] == 30
    # Failed attempts log their traceback inside their task event; nothing else may.
    crashes = [
        line for line in result.stderr.splitlines()
        if "Traceback" in line and not line.startswith('{"ts"')
    ]  # fmt: skip
    assert crashes == []


def test_environment_changes_what_the_demo_does(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    result = run("configs/demo.yaml", "--summary-json", str(summary), TASKS="7", WORKERS="1")
    assert result.returncode == 0, result.stderr
    assert json.loads(summary.read_text())["totals"]["published"] == 7
    started = [e for e in _json_lines(result.stderr) if e.get("event") == "worker.started"]
    assert started and "threads=1" in str(started[0]["detail"])


def test_run_alias_and_workers_flag(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    result = run(
        "run", "configs/demo.yaml", "--workers", "2", "--summary-json", str(summary), TASKS="3"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(summary.read_text())["totals"]["published"] == 3


def test_no_simulate_with_until_empty_exits_at_once(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    result = run(
        "configs/demo.yaml", "--no-simulate", "--until-empty", "--summary-json", str(summary)
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(summary.read_text())["totals"]["published"] == 0


def test_config_error_exits_2_without_traceback(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("workers: 0\ntask_types: {}\n")
    result = run(str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{config}:1:" in result.stderr


def test_sigterm_stops_gracefully_and_loses_nothing(tmp_path: Path) -> None:
    config = tmp_path / "slow.yaml"
    config.write_text(SLOW_PIPELINE)
    summary = tmp_path / "summary.json"
    proc = start(str(config), "--summary-json", str(summary))
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    _wait_mid_run(err)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    # Within the grace period (5 s): the two running tasks need at most 0.4 s of it, the rest
    # is margin for a loaded machine. A run that cut them short fails forced=0 below.
    assert time.monotonic() - t0 < 5.0
    assert proc.returncode == 0, err.text()
    assert "Summary" in out.text()
    events = _json_lines(err.text())
    started = {e["task_id"] for e in events if e.get("event") == "task.started"}
    succeeded = {e["task_id"] for e in events if e.get("event") == "task.succeeded"}
    assert started and started == succeeded, "a running task was not allowed to finish"
    data = json.loads(summary.read_text())
    # Everything not run was written to the dead-letter store with reason shutdown.
    assert data["dead_by_reason"].get("shutdown", 0) > 0
    assert data["totals"]["succeeded"] + data["totals"]["dead"] == 40
    stopped = [e for e in events if e.get("event") == "worker.stopped"]
    assert stopped and stopped[0]["detail"] == "forced=0"


def test_second_signal_exits_at_once_with_130(tmp_path: Path) -> None:
    config = tmp_path / "slow.yaml"
    config.write_text(
        SLOW_PIPELINE.replace("grace: 5s", "grace: 30s")
        .replace("[300ms, 400ms]", "[4s, 4.5s]")
        .replace("timeout: 5s", "timeout: 20s")
    )
    proc = start(str(config))
    Lines(proc.stdout)  # drained, and closed at its end
    err = Lines(proc.stderr)
    err.wait_for_event("task.started")  # handlers running, 4 s each
    proc.send_signal(signal.SIGINT)
    err.wait_for_event("worker.stopping")  # the first signal was taken: the grace period began
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=20)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 130, err.text()
    # At once: the running tasks had about 4 s left and the grace period is 30 s; 2 s is the
    # forced exit's own work (asking the broker, at most 0.5 s) plus margin for a loaded machine.
    assert elapsed < 2.0


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate(config: str) -> None:
    result = run("validate", f"configs/{config}")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # 8 s: two runs with a shutdown drain
def test_tasks_dead_lettered_at_shutdown_are_replayed_from_a_file_dlq(tmp_path: Path) -> None:
    dlq = tmp_path / "dlq.jsonl"
    config = tmp_path / "slow.yaml"
    config.write_text(SLOW_PIPELINE + f"dead_letter: {{kind: file, path: {dlq}}}\n")
    first = tmp_path / "first.json"
    proc = start(str(config), "--summary-json", str(first))
    Lines(proc.stdout)  # drained, and closed at its end
    err = Lines(proc.stderr)
    _wait_mid_run(err)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 0, err.text()
    shutdown = json.loads(first.read_text())["dead_by_reason"]["shutdown"]
    assert len(dlq.read_text().splitlines()) == shutdown > 0

    second = tmp_path / "second.json"
    result = run(
        str(config), "--no-simulate", "--replay", "--until-empty", "--summary-json", str(second),
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    totals = json.loads(second.read_text())["totals"]
    assert totals["published"] == shutdown
    assert totals["succeeded"] == shutdown
    assert dlq.read_text().strip() == ""
