"""Run the real dq-run console script in a subprocess, and wait for what it logs; records for
its dead-letter files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from runner.model import DeadLetter, Task

REPO = Path(__file__).resolve().parents[2]
DQ_RUN = str(Path(sys.executable).with_name("dq-run"))
#: How long a test waits for a line it expects from a child. Generous, for a loaded machine:
#: a test that passes never waits this long, it waits for the line.
WAIT_S = 20.0


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


def stats_json(config: str) -> dict[str, Any]:
    """`dq-run stats CONFIG --json`, parsed (the command must succeed)."""
    result = run("stats", config, "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


class Lines:
    """Reads a child's stream on a thread, so a test can wait for a line while the child runs
    instead of sleeping and hoping it got there. The stream is closed at its end."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None, "start the child with this stream piped"
        self.lines: list[str] = []
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.lines.append(line)
        self._ended.set()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines read so far (those of event ``name``, or all)."""
        found = [json.loads(line) for line in list(self.lines) if line.startswith("{")]
        return [e for e in found if name is None or e.get("event") == name]

    def count(self, name: str) -> int:
        """How many JSON log lines of event ``name`` were read so far."""
        return len(self.events(name))

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
        """Poll ``predicate`` until true; fail past ``timeout``, or once the stream ended
        without it (the child exited: waiting longer cannot help)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self._ended.is_set() and not predicate():
                pytest.fail(f"the stream ended before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"not within {timeout}s: {what}:\n{self.tail()}")
            time.sleep(0.02)

    def wait_for(self, text: str, timeout: float = WAIT_S) -> None:
        """Wait for a line containing ``text``."""
        self.wait_until(lambda: any(text in line for line in list(self.lines)), repr(text), timeout)

    def wait_for_event(self, name: str, count: int = 1, timeout: float = WAIT_S) -> None:
        """Wait for ``count`` JSON log lines of event ``name``."""
        self.wait_until(lambda: self.count(name) >= count, f"{count} x {name}", timeout)

    def tail(self, chars: int = 2000) -> str:
        return "".join(self.lines)[-chars:]

    def text(self) -> str:
        """Everything read, once the child has exited (its end of the pipe closed)."""
        self._thread.join(10)
        return "".join(self.lines)


def shutdown_record(type_name: str, payload: dict[str, Any]) -> DeadLetter:
    """A record of a ``type_name`` task that the memory broker's shutdown dead-lettered."""
    now = time.time()
    return DeadLetter(
        task=Task(type=type_name, payload=payload, enqueued_at=now - 5),
        reason="shutdown",
        error_type="Shutdown",
        message="the process stopped",
        traceback="",
        attempts=0,
        first_attempt_at=now,
        last_attempt_at=now,
        dead_at=now,
    )
