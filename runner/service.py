"""`dq-run run`: one worker process from start to summary, with signals handled as promised.

- First SIGINT/SIGTERM: stop taking tasks, release unstarted ones, let running handlers finish
  within ``shutdown.grace``, print the summary, exit 0.
- Second signal: flush the logs and exit at once with 130 (``os._exit``: CPython would wait
  for non-daemon threads otherwise).
- With a ``simulate`` section (and without --no-simulate) the process publishes the simulated
  tasks and exits once every task has succeeded or been dead-lettered. ``--until-empty`` exits
  when nothing is ready, delayed or running.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from runner.app import Runner, build_runtime
from runner.config import PipelineConfig
from runner.errors import RunnerError
from runner.simulate import plan_tasks

EXIT_FORCED = 130
#: How often the main thread checks whether the work is done.
_CHECK_S = 0.05
#: Simulated tasks are published in batches of this size.
_BATCH = 100


@dataclass(frozen=True)
class RunOptions:
    simulate: bool = True
    until_empty: bool = False
    replay: bool = False
    summary_json: Path | None = None


def serve(config: PipelineConfig, options: RunOptions, out: TextIO = sys.stdout) -> int:
    """Run one worker process until done or signalled; returns the exit code."""
    simulating = options.simulate and config.simulate is not None
    total = config.simulate.tasks if simulating and config.simulate is not None else None
    runner = build_runtime(config, progress_total=total)
    stop = threading.Event()
    signals = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            stop.set()
            return
        runner.close_observers()
        os._exit(EXIT_FORCED)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    producer: threading.Thread | None = None
    failure: list[BaseException] = []
    try:
        if options.replay:
            runner.replay_dead_letters()
        runner.start()
        finite = options.until_empty
        if simulating:
            finite = True
            producer = threading.Thread(
                target=_produce,
                args=(runner, config, stop, failure),
                name="dq-simulate",
                daemon=True,
            )
            producer.start()
        while not stop.wait(_CHECK_S):
            if failure:
                break
            if (
                finite
                and (producer is None or not producer.is_alive())
                and runner.run_until_empty(0)
            ):
                break
    finally:
        stop.set()
        summary = runner.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise failure[0]
    runner.summary.render(out)
    if options.summary_json is not None:
        options.summary_json.parent.mkdir(parents=True, exist_ok=True)
        options.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _produce(
    runner: Runner, config: PipelineConfig, stop: threading.Event, failure: list[BaseException]
) -> None:
    assert config.simulate is not None
    batch: list[tuple[str, object]] = []
    try:
        for item in plan_tasks(config.simulate):
            if stop.is_set():
                return
            batch.append(item)
            if len(batch) >= _BATCH:
                runner.publish_many(batch)
                batch = []
        if batch and not stop.is_set():
            runner.publish_many(batch)
    except RunnerError as exc:
        if not stop.is_set():
            failure.append(exc)
