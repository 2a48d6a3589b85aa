"""What a stop leaves behind, in words for the person who pressed Ctrl-C.

- ``drained_to(config)``: where the shutdown dead letters of a broker that is not durable
  (memory) go (a file that ``--replay`` reads, a ``module:Class`` store, or nowhere that
  outlives the process).
- ``forced_exit_line(...)``: the one line a second signal prints before the process exits with
  130. Asking the broker what is left runs on a helper thread and is waited for at most
  ``ASK_WAIT_S``: the signal handler runs on the main thread, which may be holding the very
  lock the broker needs (the memory broker's condition, the SQLite connection's lock), and a
  forced exit must not hang on it. If the broker does not answer in time, the line says so.
  (`dq-run run` runs on a thread of its own while the main thread waits, runner.ops.service,
  so that the lock a stop or a replay under way holds is let go; on the memory broker the
  line then waits for the stop's drain to be counted, ``Runner.drain_now``.)
- ``ask_within(call, wait_s)``: that helper thread, for the handler's other steps too (the
  flush of the logs, whose locks the main thread may hold as well).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

from runner.app import Runner
from runner.config.models import PipelineConfig

#: How long a forced exit waits for the broker to say what is left.
ASK_WAIT_S = 0.5
#: How long a forced exit waits for the logs and the other observers to be flushed and closed.
FLUSH_WAIT_S = 1.0

_T = TypeVar("_T")


def drained_to(config: PipelineConfig) -> str:
    """Where the dead letters (shutdown ones included) of a broker that is not durable end up,
    in a few words."""
    kind = config.dead_letter.kind
    if kind == "file":
        return f"in {config.dead_letter.path} (`dq-run run CONFIG --replay` runs them)"
    if kind in ("memory", "broker", None):
        return "in memory only: lost at exit (`dead_letter: {kind: file}` keeps them)"
    return f"in the dead-letter store {kind}"


def broker_place(config: PipelineConfig) -> str:
    """The broker in a few words, without credentials: ``the SQLite file var/queue.db``."""
    broker = config.broker
    if broker.kind == "sqlite":
        return f"the SQLite file {broker.path}"
    if broker.kind == "redis":
        url = broker.url or ""
        scheme, sep, rest = url.partition("://")
        if "@" in rest:
            url = f"{scheme}{sep}{rest.rsplit('@', 1)[1]}"
        return f"Redis at {url}"
    return f"the {broker.kind} broker"


def forced_exit_line(runner: Runner, config: PipelineConfig, stopped: bool) -> str:
    """The line a second signal prints. ``stopped``: the runner has stopped (the broker is
    closed; one that is not durable had its queue dead-lettered) and only the summary was left
    to print."""
    cut = "; the summary was cut short" if stopped else ""
    if not runner.broker.durable:
        # Dead-lettered by the stop (it got that far), or by the stop so far and by us now.
        drained = (
            len(runner.summary.drained()) if stopped else ask_within(runner.drain_now, ASK_WAIT_S)
        )
        if drained is None:
            return (
                f"forced exit: the tasks still queued or running in the {config.broker.kind} "
                "broker were lost (it did not answer in time)"
            )
        if not drained:
            return f"forced exit: nothing was left queued or running{cut}"
        return f"forced exit: {drained} unfinished tasks dead-lettered, {drained_to(config)}{cut}"
    place = broker_place(config)
    timeout = f"{config.broker.visibility_timeout:g}s"
    if stopped:
        return f"forced exit: nothing was running here; unfinished tasks stay in {place}{cut}"
    depth = ask_within(runner.depth, ASK_WAIT_S)
    running = ask_within(runner.inflight, ASK_WAIT_S)
    if depth is None or running is None:
        return (
            f"forced exit: unfinished tasks stay in {place}; those this process had leased are "
            f"handed out again after visibility_timeout ({timeout})"
        )
    # Queued and leased from one answer of the broker's, so that every task is counted once:
    # a task prefetched here and not started is leased, not running (and one handed back
    # during the stop moves from leased to ready within that answer, not between two reads).
    queued = sum(d.ready + d.delayed for d in depth.values())
    leased = sum(d.leased for d in depth.values())
    here = sum(running.values())
    return (
        f"forced exit: {queued} tasks stay queued in {place} and {leased} are leased "
        f"({here} running here); this process's leases expire after visibility_timeout "
        f"({timeout}) and their tasks are handed out again"
    )


def ask_within(call: Callable[[], _T], wait_s: float) -> _T | None:
    """``call()`` on a daemon thread; its result, or None if it raised or took over ``wait_s``."""
    result: list[_T] = []

    def run() -> None:
        # A closed or unreachable broker: the caller says it could not tell.
        with contextlib.suppress(Exception):
            result.append(call())

    helper = threading.Thread(target=run, name="dq-forced-exit", daemon=True)
    helper.start()
    helper.join(wait_s)
    return result[0] if result else None
