"""Real `dq-run run` worker processes, and the world one test runs them in.

``Worker`` wraps one process (its stdout and stderr go to files); ``Fleet`` is one test's world:
a config file, an audit dir for tests/integration/audit_handlers.py, the workers started on
that config and a broker the test publishes through. A subclass per broker (the Redis and
SQLite fault tests) supplies the config text and that broker; the knobs below are where the
two kinds of test differ.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from runner.brokers.base import Broker
from runner.model import Task
from tests.cli.run_kit import DQ_RUN, REPO, dq_env
from tests.integration.audit_handlers import Run, completed, read_runs

BrokerT = TypeVar("BrokerT", bound=Broker)


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    interval: float = 0.05,
    *,
    what: str = "",
    fail: bool = True,
) -> bool:
    """Poll ``predicate`` until true; past ``timeout`` fail the test, or return False."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            if fail:
                pytest.fail(f"not within {timeout}s: {what or 'condition'}")
            return False
        time.sleep(interval)
    return True


class Worker:
    """One `dq-run run CONFIG` process; its stdout and stderr go to files.

    ``timeout_s`` is how long ``wait_started`` and ``terminate`` wait unless told otherwise.
    """

    def __init__(self, config: Path, logs: Path, name: str, *, timeout_s: float) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.stderr_path = logs / f"{name}.err"
        self.stdout_path = logs / f"{name}.out"
        with self.stderr_path.open("w") as err, self.stdout_path.open("w") as out:
            self.process = subprocess.Popen(
                [DQ_RUN, "run", str(config)], cwd=REPO, env=dq_env(), stdout=out, stderr=err
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.stderr_path.read_text()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (those named ``name``, or all), skipping a line cut by a kill."""
        lines = []
        for text in self.log().splitlines():
            if text.startswith("{") and text.endswith("}"):  # a SIGKILL may cut the last line
                lines.append(json.loads(text))
        return [line for line in lines if name is None or line.get("event") == name]

    def wait_started(self, timeout: float | None = None) -> None:
        wait_for(
            lambda: bool(self.events("worker.started")) or self.exited(),
            self.timeout_s if timeout is None else timeout,
            what=f"{self.name} started",
        )
        assert not self.exited(), f"{self.name} exited early:\n{self.log()[-3000:]}"

    def exited(self) -> bool:
        return self.process.poll() is not None

    def terminate(self, timeout: float | None = None) -> int:
        """SIGTERM; the exit code after a graceful stop. A process still running after
        ``timeout`` fails the test with the end of its log, killed first: left running, it
        failed the next test instead (an unraisable ResourceWarning)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=self.timeout_s if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not stop on SIGTERM:\n{self.log()[-3000:]}"
            ) from None

    def kill(self) -> None:
        if not self.exited():
            self.process.kill()
            self.process.wait(timeout=10)


class Fleet(ABC, Generic[BrokerT]):
    """One test's world: a config, an audit dir, worker processes and a publishing broker.

    A subclass writes the config (``config_text``, for the options ``configure`` takes) and
    opens the broker (``open_broker``, on first use of ``broker``). ``close`` kills every
    worker still running and closes the broker.
    """

    publish_batch: int  # tasks per put_many call
    numbered = False  # whether each published payload carries its index as "n"
    poll_s: float  # how often wait_done reads the audit trail again
    worker_timeout_s: float  # how long a worker may take to start, and to stop on SIGTERM

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.audit_dir = tmp_path / "audit"
        self.audit_dir.mkdir()
        self.config = tmp_path / "pipeline.yaml"
        self.workers: list[Worker] = []
        self._broker: BrokerT | None = None
        self.configure()

    @abstractmethod
    def config_text(self, **options: Any) -> str:
        """The YAML config for ``options``: the four ``configure`` takes, plus any of its own."""

    @abstractmethod
    def open_broker(self) -> BrokerT:
        """A broker on the queue the workers use (``self.visibility`` as its lease)."""

    def configure(
        self,
        *,
        visibility: float = 30.0,
        timeout: float = 10.0,
        threads: int = 4,
        max_attempts: int = 3,
        **more: Any,
    ) -> None:
        """(Re)write the config: workers started after this read it; ``more`` goes to the text."""
        self.visibility = visibility
        self.threads = threads
        self.config.write_text(
            self.config_text(
                visibility=visibility,
                timeout=timeout,
                threads=threads,
                max_attempts=max_attempts,
                **more,
            )
        )

    @property
    def broker(self) -> BrokerT:
        if self._broker is None:
            self._broker = self.open_broker()
        return self._broker

    def start(self, count: int = 1, *, wait: bool = True) -> list[Worker]:
        """Start ``count`` workers; with ``wait``, return once each logged worker.started."""
        new = [
            Worker(
                self.config,
                self.tmp_path,
                f"worker-{len(self.workers) + i}",
                timeout_s=self.worker_timeout_s,
            )
            for i in range(count)
        ]
        self.workers += new
        for worker in new if wait else ():
            worker.wait_started()
        return new

    def publish(self, count: int, **payload: Any) -> list[str]:
        """Put ``count`` "work" tasks that audit to ``audit_dir``; returns their ids."""
        tasks = [
            Task(
                "work",
                {"audit": str(self.audit_dir), **({"n": i} if self.numbered else {}), **payload},
            )
            for i in range(count)
        ]
        for i in range(0, len(tasks), self.publish_batch):
            self.broker.put_many(tasks[i : i + self.publish_batch])
        return [t.id for t in tasks]

    def runs(self) -> list[Run]:
        return read_runs(self.audit_dir)

    def wait_done(self, ids: list[str], timeout: float) -> list[Run]:
        """Wait until every id has a completed run; returns every run recorded."""
        wanted = set(ids)
        runs: list[Run] = []

        def done() -> bool:
            nonlocal runs
            runs = self.runs()
            return wanted <= set(completed(runs))

        if not wait_for(done, timeout, self.poll_s, fail=False):
            missing = wanted - set(completed(runs))
            logs = "\n".join(w.log()[-1500:] for w in self.workers)
            pytest.fail(f"{len(missing)} of {len(wanted)} tasks never completed\n{logs}")
        return runs

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        if self._broker is not None:
            self._broker.close()
