"""Schedules: tasks published on a clock (``every: 30s``, ``cron: "0 3 * * *"``) by every worker
process at once, each tick fired exactly once, with no leader.

The broker keeps each schedule's last fired tick under the key ``schedule:<name>``. A process
that sees a tick due fires it with ``put_if``: a compare-and-set of that key from the last tick
it read to the new one, in the same step as the put of the tick's task. However many processes
try, one wins each tick; the others find the key moved on and read it again. A process killed
at any point loses nothing: either its put_if happened (the task and the new tick together) or
it did not (the next process fires the tick).

- A tick is named by its nominal time (epoch seconds, written with three decimals); ``jitter``
  only moves the task's ``not_before`` later, by up to that much. ``every`` ticks are multiples
  of the interval (in whole milliseconds) since the epoch, so every process names them alike;
  cron ticks are croniter's, in the schedule's timezone (at a daylight-saving change croniter
  skips a time that does not exist and fires a repeated one twice, once per offset).
- Time is the broker's (``Broker.now``); a process whose own clock is more than
  ``CLOCK_SKEW_WARN_S`` off the broker's logs ``schedule.clock_skew`` (it still fires by the
  broker's).
- A schedule with no stored tick (new, renamed, or its key deleted) fires nothing in the past:
  its key is set to the latest tick due, without a task, and the next tick fires.
- Ticks missed while no process ran follow ``missed``: ``all`` fires each one, in order (at most
  ``MAX_CATCH_UP`` per pass); ``once`` fires the latest one only; ``skip`` fires none of them
  (the latest one fires only if it is at most ``min(interval, 60 s)`` late).
- A full broker (QueueFull) leaves the tick unfired: it is tried again within
  ``FULL_RETRY_S``. Other broker errors are logged and retried the same way.
- A stored schedule the file no longer names is deleted when a scheduler starts.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo

from croniter import croniter

from runner.brokers.base import Broker
from runner.errors import BrokerClosed, BrokerError, QueueFull
from runner.events import Event, EventBus, EventName
from runner.model import Task

log = logging.getLogger("runner.schedule")

#: The prefix of a schedule's key in the broker (``Broker.put_if``, ``scan_values``).
KEY_PREFIX = "schedule:"
#: A process whose clock is this far off the broker's logs a warning.
CLOCK_SKEW_WARN_S = 1.0
#: How often the clock is compared again (and a skew warned about again while it lasts).
CLOCK_CHECK_S = 60.0
#: How soon a tick the broker refused (full, or an error) is tried again.
FULL_RETRY_S = 1.0
#: The longest a scheduler sleeps between passes (it wakes for each tick anyway).
MAX_SLEEP_S = 10.0
#: Ticks ``missed: all`` fires in one pass; the rest follow in the next passes.
MAX_CATCH_UP = 100
#: How late the latest tick may be and still fire under ``missed: skip``.
SKIP_GRACE_CAP_S = 60.0

Missed = Literal["skip", "once", "all"]


@dataclass(frozen=True)
class Schedule:
    """One schedule: which task to publish, and when (``every`` seconds, or a ``cron``
    expression read in ``timezone``)."""

    name: str
    type: str
    payload: Any = None
    every: float | None = None
    cron: str | None = None
    timezone: str = "UTC"
    jitter: float = 0.0
    missed: Missed = "once"

    def __post_init__(self) -> None:
        if (self.every is None) == (self.cron is None):
            raise ValueError(f"schedule {self.name!r}: give one of every and cron")
        if self.every is not None and not self.every > 0:
            raise ValueError(f"schedule {self.name!r}: every must be positive")

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.name

    def describe(self) -> str:
        """``every 30s`` or ``cron 0 3 * * * (Europe/Berlin)``."""
        if self.every is not None:
            return f"every {self.every:g}s"
        return f"cron {self.cron} ({self.timezone})"

    def next_after(self, t: float) -> float:
        """The first tick strictly after ``t`` (epoch seconds, to the millisecond)."""
        if self.every is not None:
            # In whole milliseconds, so that a tick read back from its key is the same float.
            every_ms = max(round(self.every * 1000), 1)
            return (round(t * 1000) // every_ms + 1) * every_ms / 1000
        assert self.cron is not None
        zone = ZoneInfo(self.timezone)
        return float(croniter(self.cron, datetime.fromtimestamp(t, zone)).get_next(float))

    def latest(self, t: float) -> float:
        """The last tick at or before ``t``."""
        if self.every is not None:
            every_ms = max(round(self.every * 1000), 1)
            return round(t * 1000) // every_ms * every_ms / 1000
        assert self.cron is not None
        zone = ZoneInfo(self.timezone)
        after = self.next_after(t)
        return float(croniter(self.cron, datetime.fromtimestamp(after, zone)).get_prev(float))

    def grace(self, tick: float) -> float:
        """How late ``tick`` may fire under ``missed: skip``: its interval, at most 60 s."""
        return min(self.next_after(tick) - tick, SKIP_GRACE_CAP_S)


def tick_value(tick: float) -> str:
    """A tick as its key holds it: epoch seconds with three decimals."""
    return f"{tick:.3f}"


def tick_name(tick: float) -> str:
    """A tick for people and logs: ISO 8601 in UTC, to the millisecond."""
    stamp = datetime.fromtimestamp(tick, timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


#: Builds the task a tick publishes: (schedule, tick, not_before) -> Task. The runner's publish
#: path (its middleware's on_publish hooks, the type's expiry) builds it.
Draft = Callable[[Schedule, float, float], Task]


class Scheduler:
    """Fires the schedules' ticks from its own thread (``start``/``stop``), or one pass at a
    time (``run_once``, for tests)."""

    def __init__(
        self,
        broker: Broker,
        schedules: Sequence[Schedule],
        draft: Draft,
        events: EventBus,
        rng: random.Random | None = None,
    ) -> None:
        self._broker = broker
        self._schedules = tuple(schedules)
        self._draft = draft
        self._events = events
        self._rng = rng or random.Random()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._clock_checked_at = -math.inf

    @property
    def schedules(self) -> tuple[Schedule, ...]:
        return self._schedules

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dq-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self.forget_removed()
        except BrokerClosed:
            return
        except BrokerError as exc:
            log.warning("schedule state not cleaned: %s", exc)
        while not self._stopping.is_set():
            try:
                wait_s = self.run_once()
            except BrokerClosed:
                return
            except Exception as exc:  # a broker error, or a draft refused: logged, tried again
                self._events.emit(Event(EventName.SCHEDULE_FAILED, error=_error(exc)))
                wait_s = FULL_RETRY_S
            self._stopping.wait(wait_s)

    def forget_removed(self) -> list[str]:
        """Delete the stored ticks of schedules this file no longer names; returns their names."""
        named = {schedule.key for schedule in self._schedules}
        gone = sorted(key for key in self._broker.scan_values(KEY_PREFIX) if key not in named)
        if gone:
            self._broker.delete_values(gone)
        names = [key[len(KEY_PREFIX) :] for key in gone]
        for name in names:
            self._events.emit(Event(EventName.SCHEDULE_REMOVED, schedule=name))
        return names

    def run_once(self) -> float:
        """Fire every tick due now; returns how long to sleep before the next pass."""
        if not self._schedules:
            return MAX_SLEEP_S
        now = self._broker.now()
        self._check_clock(now)
        stored = self._broker.read_values([schedule.key for schedule in self._schedules])
        wait_s = MAX_SLEEP_S
        for schedule in self._schedules:
            raw = stored.get(schedule.key)
            try:
                if raw is None:
                    self._begin(schedule, now)
                    last = schedule.latest(now)
                else:
                    last = self._catch_up(schedule, float(raw), now)
            except QueueFull as exc:
                self._events.emit(
                    Event(EventName.SCHEDULE_FULL, schedule=schedule.name, error=_error(exc))
                )
                wait_s = min(wait_s, FULL_RETRY_S)
                continue
            # A few milliseconds past the tick, so the next pass finds it due on the broker's
            # clock even when the two clocks differ by a little.
            wait_s = min(wait_s, schedule.next_after(max(last, now)) - now + 0.005)
        return max(wait_s, 0.0)

    def _begin(self, schedule: Schedule, now: float) -> None:
        """A schedule with no stored tick fires nothing in the past: its latest tick is marked
        fired, without a task."""
        self._broker.put_if(schedule.key, None, tick_value(schedule.latest(now)), [])

    def _catch_up(self, schedule: Schedule, last: float, now: float) -> float:
        """Fire what is due after ``last`` (by ``missed``); returns the last tick known fired."""
        latest = schedule.latest(now)
        if latest <= last:
            return last
        if schedule.missed == "all":
            tick = schedule.next_after(last)
            for _ in range(MAX_CATCH_UP):
                if tick > now or not self._fire(schedule, last, tick, now, with_task=True):
                    break
                last, tick = tick, schedule.next_after(tick)
            return last
        on_time = schedule.missed == "once" or now - latest <= schedule.grace(latest)
        skipped = _ticks_between(schedule, last, latest) - (1 if on_time else 0)
        if self._fire(schedule, last, latest, now, with_task=on_time) and skipped:
            self._events.emit(
                Event(
                    EventName.SCHEDULE_MISSED,
                    schedule=schedule.name,
                    tick=tick_name(latest),
                    detail=f"{skipped} tick(s) not fired (missed: {schedule.missed})",
                )
            )
        return latest

    def _fire(
        self, schedule: Schedule, last: float, tick: float, now: float, with_task: bool
    ) -> bool:
        """Move the schedule's key from ``last`` to ``tick``, with the tick's task when
        ``with_task``; False when another process moved it first."""
        task: Task | None = None
        if with_task:
            not_before = tick + self._rng.uniform(0.0, schedule.jitter) if schedule.jitter else 0.0
            task = self._draft(schedule, tick, not_before)
        tasks = [task] if task is not None else []
        if not self._broker.put_if(schedule.key, tick_value(last), tick_value(tick), tasks):
            return False
        if task is not None:
            self._events.emit(
                Event(EventName.TASK_PUBLISHED, task_id=task.id, type=task.type, attempt=0)
            )
            self._events.emit(
                Event(
                    EventName.SCHEDULE_FIRED,
                    task_id=task.id,
                    type=task.type,
                    schedule=schedule.name,
                    tick=tick_name(tick),
                    lag_s=max(now - tick, 0.0),
                )
            )
        return True

    def _check_clock(self, broker_now: float) -> None:
        here = time.time()
        if here - self._clock_checked_at < CLOCK_CHECK_S:
            return
        self._clock_checked_at = here
        skew = here - broker_now
        if abs(skew) > CLOCK_SKEW_WARN_S:
            self._events.emit(
                Event(
                    EventName.SCHEDULE_CLOCK_SKEW,
                    lag_s=skew,
                    detail=f"this process's clock is {skew:+.3f}s off the broker's; "
                    "schedules fire by the broker's clock",
                )
            )


def _ticks_between(schedule: Schedule, last: float, latest: float) -> int:
    """How many ticks fall in (last, latest] (counted up to 10,000)."""
    if schedule.every is not None:
        return max(round((latest - last) / schedule.every), 0)
    count, tick = 0, last
    while count < 10_000:
        tick = schedule.next_after(tick)
        if tick > latest:
            break
        count += 1
    return count


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
