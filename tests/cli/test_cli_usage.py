"""dq-run's command line as typed by a person: a mistyped command is named, not run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cli.run_kit import REPO, dq_env, run


@pytest.mark.parametrize(
    ("args", "typo", "meant"),
    [
        (["valdate", "configs/demo.yaml"], "valdate", "validate"),
        (["valdate"], "valdate", "validate"),
        (["conifg", "configs/demo.yaml"], "conifg", "config"),
        (["stat", "configs/sqlite.yaml"], "stat", "stats"),
        (["dlq", "lst", "configs/demo.yaml"], "lst", "list"),
    ],
)
def test_a_mistyped_command_suggests_the_one_meant_and_exits_2(
    args: list[str], typo: str, meant: str
) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert f"no such command {typo!r}; did you mean {meant!r}?" in result.stderr
    assert "unexpected extra argument" not in result.stderr  # not taken for `run`
    assert result.stdout == ""


def test_an_unknown_word_before_a_config_lists_the_commands() -> None:
    result = run("frobnicate", "configs/demo.yaml")
    assert result.returncode == 2
    assert "no such command 'frobnicate' (commands: run, validate, config" in result.stderr


def test_a_config_path_still_means_run() -> None:
    missing = run("configs/nope.yaml")  # `dq-run CONFIG` is `dq-run run CONFIG`
    assert missing.returncode == 2
    assert "configs/nope.yaml: cannot read the file" in missing.stderr
    ok = run("validate", "configs/demo.yaml")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "configs/demo.yaml"],  # success: exit 0 and the same output
        ["valdate", "configs/demo.yaml"],  # a usage error: exit 2 and the same line
        ["validate", "tests/cli/invalid/never_retry_not_exception.yaml"],  # config error: 2
    ],
)
def test_python_dash_m_runner_is_the_same_command_line(args: list[str]) -> None:
    dq_run = run(*args)
    module = subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=REPO,
        env=dq_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (module.returncode, module.stdout, module.stderr) == (
        dq_run.returncode,
        dq_run.stdout,
        dq_run.stderr,
    )
