"""2,000 handlers interrupted while they log: no deadlock, no lost thread, a clean exit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.cli.run_kit import DQ_RUN, REPO, dq_env

STORM = """
workers: 4
retry: {max_attempts: 1}
logging: {format: json, level: INFO}
shutdown: {grace: 5s}
task_types:
  storm: {handler: tests.stress.storm_handlers:log_until_interrupted, timeout: 4ms}
simulate:
  tasks: 2000
  mix: {storm: 1}
  faults:
    storm: {latency: [0ms, 0ms]}
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_interrupt_storm_while_logging(tmp_path: Path) -> None:
    config = tmp_path / "storm.yaml"
    config.write_text(STORM)
    summary_path = tmp_path / "summary.json"
    with (tmp_path / "stderr.log").open("w") as stderr:
        result = subprocess.run(
            [DQ_RUN, str(config), "--summary-json", str(summary_path)],
            cwd=REPO,
            env=dq_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=180,  # a deadlock shows up as this timeout
            check=False,
        )
    assert result.returncode == 0
    summary = json.loads(summary_path.read_text())
    assert summary["totals"]["published"] == 2000
    assert summary["by_type"]["storm"]["dead"] == 2000
    assert summary["by_type"]["storm"]["timed_out"] == 2000
    assert summary["worker_threads"] == {"configured": 4, "alive": 4}
    assert summary["interrupts"] >= 1000  # most ended by an interrupt, the rest by the flag
    lines = (tmp_path / "stderr.log").read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    handler_lines = [e for e in events if e.get("event") == "task.log"]
    assert len(handler_lines) > 2000, "the handlers did not log while being interrupted"
    assert any(e.get("event") == "worker.stopped" for e in events)
