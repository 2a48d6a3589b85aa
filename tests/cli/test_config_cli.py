"""dq-run validate / config / schema, run as a user runs them: the console script, in a subprocess.

The invalid corpus lives in tests/cli/invalid/: one file per mistake, whose leading comments say
``# expect LINE: fragment`` for each problem the file must produce. All files go through a single
``dq-run validate`` call (one process start, not fifty).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INVALID = Path(__file__).resolve().parent / "invalid"
CORPUS = sorted(INVALID.glob("*.yaml"))
DQ_RUN = str(Path(sys.executable).parent / "dq-run")
_EXPECT = re.compile(r"^# expect (\d+): (.+)$")


def dq_run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("DQ_")}
    for name in ("WORKERS", "TASKS", "MAX_ATTEMPTS", "REDIS_URL"):
        clean.pop(name, None)
    return subprocess.run(
        [DQ_RUN, *args],
        check=False,
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
    )


def expectations(path: Path) -> list[tuple[int, str]]:
    found = []
    for line in path.read_text().splitlines():
        match = _EXPECT.match(line)
        if match:
            found.append((int(match.group(1)), match.group(2)))
    return found


@pytest.fixture(scope="module")
def corpus_run() -> subprocess.CompletedProcess[str]:
    return dq_run("validate", *(str(p.relative_to(ROOT)) for p in CORPUS))


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30
    assert all(expectations(p) for p in CORPUS), "every corpus file states what it expects"


def test_corpus_fails_cleanly(corpus_run: subprocess.CompletedProcess[str]) -> None:
    assert corpus_run.returncode == 2
    assert "Traceback" not in corpus_run.stderr
    assert corpus_run.stdout == ""  # no file is OK


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_file(path: Path, corpus_run: subprocess.CompletedProcess[str]) -> None:
    name = str(path.relative_to(ROOT))
    lines = [line for line in corpus_run.stderr.splitlines() if line.startswith(name + ":")]
    for line_no, fragment in expectations(path):
        hits = [x for x in lines if x.startswith(f"{name}:{line_no}:") and fragment in x]
        assert hits, f"expected line {line_no} with {fragment!r}; got:\n" + "\n".join(lines)
    for line in lines:  # one problem per line: file:LINE:COL: [key.path: ]message
        assert re.match(rf"{re.escape(name)}:\d+:\d+: \S", line), line


def test_validate_shipped_configs() -> None:
    result = dq_run("validate", "configs/demo.yaml", "configs/sqlite.yaml", "configs/redis.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "OK configs/demo.yaml (3 task types, broker memory)",
        "OK configs/sqlite.yaml (3 task types, broker sqlite)",
        "OK configs/redis.yaml (3 task types, broker redis)",
    ]
    assert result.stderr == ""


def test_validate_reports_env_problems_and_warnings() -> None:
    result = dq_run(
        "validate",
        "configs/demo.yaml",
        env={"DQ_BROKER__CAPACTY": "5", "DQ_WORKERS": "1", "WORKERS": "2"},
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "env DQ_BROKER__CAPACTY: broker.capacty: unknown key 'capacty' (did you mean 'capacity'?)"
    ]
    result = dq_run("validate", "configs/demo.yaml", env={"WORKERS": "1"})
    assert result.returncode == 0  # a concurrency above workers is only a warning
    assert "configs/demo.yaml: warning: task_types.email.concurrency: 2 is above workers (1)" in (
        result.stderr
    )


def test_misindented_keys_are_named_as_such_not_in_pydantic_wording() -> None:
    name = "tests/cli/invalid/misindented_task_type.yaml"
    for command in ("validate", "run"):
        result = dq_run(command, name)
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"{name}:6:3: task_types.email: has no keys: are the lines below it indented?",
            f"{name}:11:1: retry: has no keys: are the lines below it indented?",
        ]


def test_validate_mixes_ok_and_bad_files() -> None:
    result = dq_run("validate", "configs/demo.yaml", "tests/cli/invalid/workers_zero.yaml")
    assert result.returncode == 2
    assert result.stdout == "OK configs/demo.yaml (3 task types, broker memory)\n"
    assert "workers_zero.yaml:2:10: workers:" in result.stderr


def test_config_prints_sources_and_loads_back(tmp_path: Path) -> None:
    env = {"DQ_TASK_TYPES__EMAIL__CONCURRENCY": "4", "TASKS": "25"}
    result = dq_run("config", "configs/demo.yaml", "--workers", "6", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "workers: 6  # flag --workers" in out
    assert "concurrency: 4  # env DQ_TASK_TYPES__EMAIL__CONCURRENCY" in out
    assert "tasks: 25  # configs/demo.yaml:" in out
    assert "overflow: block  # default" in out
    assert "prefetch: 96  # computed: 16 x workers" in out  # not `prefetch: null`
    assert "    concurrency: 6  # computed: workers" in out  # report: no concurrency set
    assert "null  # computed" not in out
    effective = tmp_path / "effective.yaml"
    effective.write_text(out)
    again = dq_run("config", str(effective))
    assert again.returncode == 0, again.stderr
    strip = re.compile(r"  # .*$", re.MULTILINE)
    body = [line for line in strip.sub("", out).splitlines() if not line.startswith("#")]
    body_again = [line for line in strip.sub("", again.stdout).splitlines() if line[:1] != "#"]
    assert body_again == body


def test_schema_is_json_and_matches_the_shipped_file() -> None:
    result = dq_run("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["properties"]["task_types"]["type"] == "object"
    assert json.loads((ROOT / "configs" / "schema.json").read_text()) == schema


def test_missing_file_is_a_usage_error() -> None:
    result = dq_run("validate", "configs/nope.yaml")
    assert result.returncode == 2
    assert result.stderr.startswith("configs/nope.yaml: cannot read the file")
