"""dq-run on a broker of one's own (``broker.kind: module:Class``), as a user runs it.

The broker classes are in tests/unit/plugin_brokers.py, outside the package; the config errors
of a bad ``module:Class`` are in the tests/cli/invalid corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.run_kit import run

PIPELINE = """
broker:
  kind: tests.unit.plugin_brokers:{cls}
  options: {{label: cli}}
workers: 3
retry: {{max_attempts: 5, backoff: {{initial: 10ms, max: 10ms}}}}
task_types:
  work: {{handler: handlers.demo:send_email, timeout: 5s}}
simulate:
  tasks: 60
  mix: {{work: 1}}
  faults:
    work: {{latency: [1ms, 5ms], failure_rate: 0.2}}
"""


def _config(tmp_path: Path, cls: str) -> Path:
    path = tmp_path / "plugin.yaml"
    path.write_text(PIPELINE.format(cls=cls))
    return path


def test_dq_run_runs_a_simulated_pipeline_on_a_plug_in_broker(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    config = _config(tmp_path, "BatchingBroker")
    result = run("run", str(config), "--summary-json", str(summary))
    assert result.returncode == 0, result.stderr
    totals = json.loads(summary.read_text())["totals"]
    assert totals["published"] == 60
    assert totals["succeeded"] + totals["dead"] == 60
    assert totals["retried"] > 0  # retries went through the plug-in too


def test_dq_run_publish_refuses_a_plug_in_that_is_not_shared(tmp_path: Path) -> None:
    config = _config(tmp_path, "WrappedBroker")
    result = run("publish", str(config), "work", "{}")
    assert result.returncode == 2, result.stderr
    assert (
        "cannot publish: a tests.unit.plugin_brokers:WrappedBroker broker lives inside the one "
        "dq-run process that runs it"
    ) in " ".join(result.stderr.split())
