"""Run the real dq-run console script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DQ_RUN = str(Path(sys.executable).with_name("dq-run"))


def dq_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("DQ_") or k == "DQ_REQUIRE_REDIS"
    }
    env.update(extra)
    return env


def start(*args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [DQ_RUN, *args],
        cwd=REPO,
        env=dq_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DQ_RUN, *args],
        cwd=REPO,
        env=dq_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
