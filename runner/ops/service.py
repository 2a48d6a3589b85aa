"""`dq-run run`: one worker process from start to summary, with signals handled as promised.

- First SIGINT/SIGTERM: stop taking tasks, release unstarted ones, let running handlers finish
  within ``shutdown.grace``, print the summary, exit 0.
- Second signal, at any point until the process exits (the summary's printing included: the
  handlers stay ours): stop the progress view, flush the logs, print one line saying what was
  left (runner.ops.leftover: on the memory broker the queue is dead-lettered first, and the line
  says where the records went) and exit at once with 130 (``os._exit``: CPython would wait for
  non-daemon threads otherwise).
- The run (replay, work, stop, summary) goes on a thread of its own; the main thread, where
  the signal handlers run, only waits for it (``_off_main``), so a handler never finds a lock
  of the run held by the very thread it interrupted.
- Tasks the memory broker dead-letters at shutdown are logged one line per type
  (``tasks.drained``, WARNING), not one per task.
- Simulated tasks are published in batches; each batch is one INFO line (``tasks.published``),
  the per-task ``task.published`` events are DEBUG.
- With a ``simulate`` section (and without --no-simulate) the process publishes the simulated
  tasks and exits once every task has succeeded or been dead-lettered. ``--until-empty`` exits
  when nothing is ready, delayed or running.
- Threads a handler started and left running must not keep the process alive once the runner
  has stopped: ``serve`` logs their names (``process.threads_left``) and the CLI then exits
  without waiting for them (``os._exit`` after flushing stdout and stderr). The runner's own
  threads are daemons, stopped by ``Runner.stop``; everything of ours (logs, metrics, summary,
  the broker's last settles) is written out before that check.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from runner.app import PublishItem, Runner, build_runtime
from runner.config.models import PipelineConfig
from runner.errors import RunnerError
from runner.model import DeadReason
from runner.observe.logs import LogListener, log_event, terminal_width, wrap_line
from runner.ops.leftover import FLUSH_WAIT_S, ask_within, drained_to, forced_exit_line
from runner.ops.produce import plan_tasks

EXIT_FORCED = 130
#: How often the main thread checks whether the work is done.
_CHECK_S = 0.05
#: Simulated tasks are published in batches of this size.
_BATCH = 100

_log = logging.getLogger("runner.service")


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
    stopped = threading.Event()  # the runner has stopped: only the summary is left to print
    signals = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # A handler runs on the main thread between two of its bytecodes. That thread only
        # waits for the run (_off_main), but a handler that takes a lock would wait forever
        # for one the interrupted thread held (a SIGTERM once hung `dq-run run` in stop.wait(),
        # when the run was on the main thread). So the first signal is only counted, and the
        # run's loop, which looks every _CHECK_S, stops.
        nonlocal signals
        signals += 1
        if signals == 1:
            return
        line = forced_exit_line(runner, config, stopped.is_set())
        # The flush takes the logs' locks, which this thread may hold where the signal landed.
        ask_within(runner.close_observers, FLUSH_WAIT_S)
        _last_words(line)
        os._exit(EXIT_FORCED)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = _off_main(
            lambda: _run(runner, config, options, stop, stopped, out, lambda: signals > 0)
        )
    finally:
        # After a first signal the handlers stay ours until the process exits, so a second
        # one still means 130 (Python's own would raise KeyboardInterrupt: exit 1).
        if signals == 0:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return code


def _run(
    runner: Runner,
    config: PipelineConfig,
    options: RunOptions,
    stop: threading.Event,
    stopped: threading.Event,
    out: TextIO,
    signalled: Callable[[], bool],
) -> int:
    simulating = options.simulate and config.simulate is not None
    producer: threading.Thread | None = None
    failure: list[BaseException] = []
    try:
        if options.replay:
            replayed = runner.replay_dead_letters()
            runner.summary.replayed = replayed
            message = f"replayed {replayed} dead letters"
            log_event(_log, logging.INFO, "tasks.replayed", message, count=replayed)
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
        # Nothing sets stop before the finally below (which does it for the producer): its
        # wait is this loop's pause, and a signal is seen through signalled().
        while not stop.wait(_CHECK_S):
            if failure or signalled():
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
        stopped.set()
        _warn_threads_left(runner)
    if failure:
        raise failure[0]
    where = None if runner.broker.durable else drained_to(config)
    _log_drained(runner, where)
    runner.summary.render(out, drained_to=where)
    if options.summary_json is not None:
        options.summary_json.parent.mkdir(parents=True, exist_ok=True)
        options.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _off_main(work: Callable[[], int]) -> int:
    """``work()`` (the run, from the replay to the summary) on a thread of its own while the
    main thread only waits for it. A signal's handler runs on the main thread, between two of
    its steps: waiting, it holds none of the locks the run takes (the memory broker's, the
    dead-letter file's), so a second signal's handler can ask the broker what is left while
    the run goes on. (When the run was on the main thread, a second signal that landed in the
    stop's drain, or in a replay, kept the broker's lock held for good: the line said the
    queued tasks were lost, and they were.) What ``work`` raises is raised here."""
    code: list[int] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            code.append(work())
        except BaseException as exc:  # raised again on the main thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="dq-run")
    thread.start()
    while thread.is_alive():
        thread.join(_CHECK_S)  # a signal's handler runs between two of these waits
    if failure:
        raise failure[0]
    return code[0]


def _produce(
    runner: Runner, config: PipelineConfig, stop: threading.Event, failure: list[BaseException]
) -> None:
    assert config.simulate is not None
    planned = config.simulate.tasks
    published = 0
    batch: list[PublishItem] = []

    def put(batch: list[PublishItem]) -> None:
        nonlocal published
        runner.publish_many(batch)
        published += len(batch)
        by_type = Counter(item[0] for item in batch)
        mix = ", ".join(f"{name} {n}" for name, n in sorted(by_type.items()))
        message = f"published {len(batch)} tasks ({published}/{planned}): {mix}"
        log_event(_log, logging.INFO, "tasks.published", message, count=len(batch))

    try:
        for item in plan_tasks(config.simulate):
            if stop.is_set():
                return
            batch.append(item)
            if len(batch) >= _BATCH:
                put(batch)
                batch = []
        if batch and not stop.is_set():
            put(batch)
    except RunnerError as exc:
        if not stop.is_set():
            failure.append(exc)


def _log_drained(runner: Runner, where: str | None) -> None:
    """One WARNING line per type for the tasks the memory broker dead-lettered at shutdown
    (their per-task ``task.dead`` lines are DEBUG). The logs are closed by now: write_now."""
    drained = runner.summary.drained()
    by_type = Counter(d["type"] for d in drained)
    logs = [lis for lis in runner.events.listeners if isinstance(lis, LogListener)]
    if not by_type or not logs:
        return
    for type_name, count in sorted(by_type.items()):
        message = f"{count} tasks dead-lettered at shutdown"
        if where:
            message += f", {where}"
        logs[0].write_now(
            logging.WARNING, "tasks.drained", message, type=type_name, count=count,
            reason=DeadReason.SHUTDOWN,
        )  # fmt: skip


def _last_words(line: str) -> None:
    """Write ``line`` to stderr from a signal handler, as the process's last: straight to the
    file descriptor (the main thread may be inside a write to sys.stderr, whose buffer is not
    reentrant), wrapped with an indent on a terminal. The run goes on on its own thread until
    the exit, so stdout and stderr are first pointed at /dev/null: nothing it writes (the
    summary, a last log line) comes after this line."""
    width = terminal_width(sys.__stderr__)
    columns = width() if width is not None else None
    if columns is not None:
        line = wrap_line(line, columns, indent="  ")
    err = 2
    with contextlib.suppress(OSError):
        err = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(null, fd)
    with contextlib.suppress(OSError):
        os.write(err, (line + "\n").encode("utf-8", "replace"))


def threads_left() -> list[threading.Thread]:
    """Non-daemon threads running besides the main one and this one: CPython waits for them
    at exit. Once the runner has stopped, these are threads a handler started and left."""
    ours = (threading.main_thread(), threading.current_thread())
    return [t for t in threading.enumerate() if t not in ours and not t.daemon and t.is_alive()]


def _warn_threads_left(runner: Runner) -> None:
    left = threads_left()
    if not left:
        return
    names = sorted(t.name for t in left)
    message = f"exiting without waiting for {len(names)} thread(s) a handler left running"
    logs = [lis for lis in runner.events.listeners if isinstance(lis, LogListener)]
    if logs:
        logs[0].write_now(logging.WARNING, "process.threads_left", message, threads=names)
    else:
        print(f"warning: {message}", file=sys.stderr, flush=True)
