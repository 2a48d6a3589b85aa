"""Hostile input to the CLI (issue 16): one clear line, exit 2, nothing stored."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.run_kit import DQ_RUN, REPO, dq_env, run

PIPELINE = """
broker: {{kind: sqlite, path: {db}}}
logging: {{format: json, level: WARNING}}
task_types:
  free: {{handler: tests.cli.admin_handlers:needs_marker}}
"""


def _config(tmp_path: Path) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(db=tmp_path / "q.db"))
    return str(path)


def _queued(config: str) -> int:
    result = run("stats", config, "--json")
    assert result.returncode == 0, result.stderr
    types = json.loads(result.stdout)["types"].values()
    return sum(t["ready"] + t["delayed"] + t["leased"] for t in types)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ('{"x": NaN}', "NaN is not JSON"),
        ('{"x": Infinity}', "Infinity is not JSON"),
        ('{"x": [1, -Infinity]}', "-Infinity is not JSON"),
        ('{"x": "\\ud800"}', "lone surrogate"),
        ('{"\\udfff": 1}', "lone surrogate"),
    ],
)
def test_a_payload_json_cannot_carry_is_refused(tmp_path: Path, payload: str, problem: str) -> None:
    config = _config(tmp_path)
    line = _one_line(run("publish", config, "free", payload))
    assert line.startswith("PAYLOAD_JSON:")
    assert problem in line
    assert _queued(config) == 0


def test_a_file_line_json_cannot_carry_is_refused_by_line(tmp_path: Path) -> None:
    config = _config(tmp_path)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"type": "free", "payload": {}}\n{"type": "free", "payload": {"x": NaN}}\n')
    line = _one_line(run("publish", config, "--file", str(jobs)))
    assert line.startswith(f"{jobs}:2: ")
    assert "NaN is not JSON" in line
    jobs.write_text('{"type": "free", "payload": {"x": "\\udc80"}}\n')
    line = _one_line(run("publish", config, "--file", str(jobs)))
    assert line.startswith(f"{jobs}:1: payload: ")
    assert "lone surrogate" in line
    assert _queued(config) == 0


def test_invalid_utf8_in_a_file_is_refused_by_line(tmp_path: Path) -> None:
    config = _config(tmp_path)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(b'{"type": "free", "payload": {}}\n{"type": "free", "payload": "\xff"}\n')
    line = _one_line(run("publish", config, "--file", str(jobs)))
    assert line.startswith(f"{jobs}:2: invalid UTF-8")
    assert _queued(config) == 0


def test_invalid_utf8_on_stdin_is_refused_by_line(tmp_path: Path) -> None:
    config = _config(tmp_path)
    result = subprocess.run(
        [DQ_RUN, "publish", config, "--file", "-"],
        cwd=REPO,
        env=dq_env(),
        input=b'{"type": "free", "payload": "caf\xe9"}\n',
        capture_output=True,
        timeout=60,
        check=False,
    )
    text = subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )
    line = _one_line(text)
    assert line.startswith("<stdin>:1: invalid UTF-8")
    assert _queued(config) == 0


def test_a_truncated_queue_file_is_refused_with_exit_3(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert run("publish", config, "free", "{}").returncode == 0
    db = tmp_path / "q.db"
    for leftover in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        leftover.unlink(missing_ok=True)
    db.write_bytes(b"")  # truncated: no longer a queue, and must not become a new, empty one
    result = run("stats", config)
    assert result.returncode == 3, result.stderr
    assert "holds no queue" in result.stderr
    assert "Traceback" not in result.stderr
    assert db.stat().st_size == 0


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """``path`` cannot be written while inside (root ignores modes: the immutable flag then)."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o600)
        return
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip("running as root without chattr: cannot make a file read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_commands_work_on_a_read_only_database(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert run("publish", config, "free", '{"n": 1}').returncode == 0
    db = tmp_path / "q.db"
    with _read_only(db):
        stats = run("stats", config, "--json")
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["types"]["free"]["ready"] == 1
        listed = run("dlq", "list", config)
        assert listed.returncode == 0, listed.stderr
        published = run("publish", config, "free", "{}")  # a write still says why it cannot
        assert published.returncode == 3
        assert "read" in published.stderr
