"""dq-run result: a task's kept result (its type's `results`), read from another process."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.run_kit import run

PIPELINE = """
broker: {{kind: sqlite, path: {db}}}
task_types:
  echo: {{handler: tests.unit.flow_handlers:echo, results: {{ttl: 10m}}}}
  plain: {{handler: tests.unit.flow_handlers:echo}}
"""


def test_a_result_is_printed_once_the_task_is_done(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text(PIPELINE.format(db=tmp_path / "q.db"))
    kept = run("publish", str(config), "echo", '{"n": 1}').stdout.strip()
    plain = run("publish", str(config), "plain", '{"n": 2}').stdout.strip()
    waiting = run("result", str(config), kept)
    assert waiting.returncode == 1
    assert "still running" in waiting.stderr

    assert run("run", str(config), "--until-empty").returncode == 0
    shown = run("result", str(config), kept, "--wait", "10s")
    assert shown.returncode == 0, shown.stderr
    found = json.loads(shown.stdout)
    assert (found["state"], found["value"]) == ("succeeded", {"n": 1})
    assert run("result", str(config), plain).returncode == 1  # its type keeps none
