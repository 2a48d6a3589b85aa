"""execution: process: a worker SIGKILLed with its children busy leaves no orphan (each child
sees its pipe to the parent close and exits within 2 s), whatever its handler is doing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runner import build_runtime
from runner.config.load import load_config

CONFIG = """\
broker: {{kind: sqlite, path: {db}, visibility_timeout: 3s}}
retry: {{max_attempts: 3}}
task_types:
  slow:
    handler: tests.unit.proc_handlers:note_and_sleep
    execution: process
    concurrency: 2
    timeout: 1s
    kill_grace: 0.5s
logging: {{format: json, level: INFO}}
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_children_die_with_their_parent(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(CONFIG.format(db=tmp_path / "q.db"))
    marks = tmp_path / "marks"
    marks.mkdir()
    config = load_config(path)
    publisher = build_runtime(config, observe=False)
    ids = publisher.publish_many([("slow", {"dir": str(marks), "s": 60})] * 2)
    publisher.broker.close()
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "runner", "run", str(path), "--no-simulate"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while len(list(marks.glob("*.pid"))) < 2:
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.05)
            pids = [int(p.read_text()) for p in marks.glob("*.pid")]
            assert all(_alive(pid) for pid in pids)
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(10)
            killed_at = time.monotonic()
            while any(_alive(pid) for pid in pids) and time.monotonic() - killed_at < 5:
                time.sleep(0.02)
            gone_after = time.monotonic() - killed_at
        finally:
            if worker.poll() is None:
                worker.kill()
    assert not any(_alive(pid) for pid in pids)
    assert gone_after < 2.0, gone_after
    assert {p.stem for p in marks.glob("*.pid")} == set(ids)
