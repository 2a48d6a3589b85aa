"""The scheduler (runner.engine.schedule) on a memory broker with a clock the test moves: ticks
fire once each whatever number of schedulers share the broker, new schedules fire nothing in the
past, missed ticks follow ``missed``, a full broker leaves the tick unfired, and cron ticks are
read in their timezone."""

from __future__ import annotations

import random
import time
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from runner.brokers.memory import MemoryBroker
from runner.deadletter.memory import MemoryDeadLetters
from runner.engine.schedule import Schedule, Scheduler, tick_name, tick_value
from runner.events import Event, EventBus, EventName
from runner.model import Task

T0 = 1_800_000_000.0  # a whole second, and a whole minute


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def handle(self, event: Event) -> None:
        self.events.append(event)

    def named(self, name: EventName) -> list[Event]:
        return [e for e in self.events if e.name == name]


def _draft(schedule: Schedule, tick: float, not_before: float) -> Task:
    headers = {"schedule": schedule.name, "tick": tick_name(tick)}
    return Task(
        type=schedule.type, payload=schedule.payload, not_before=not_before, headers=headers
    )


def _broker(clock: Clock, capacity: int = 1000) -> MemoryBroker:
    return MemoryBroker(
        capacity=capacity,
        enqueue_timeout=0.1,
        overflow="block",
        visibility_timeout=30,
        dead_letters=MemoryDeadLetters(),
        clock=clock,
    )


def _scheduler(broker: MemoryBroker, *schedules: Schedule) -> tuple[Scheduler, Recorder]:
    recorder = Recorder()
    return Scheduler(broker, schedules, _draft, EventBus([recorder]), random.Random(7)), recorder


def _fired(broker: MemoryBroker) -> list[str]:
    """The ticks of every task in the broker (its headers), in hand-out order."""
    got = broker.get({"email": 10_000}, 10_000, 0)
    for delivery in got:
        broker.ack(delivery)
    return [d.task.headers["tick"] for d in got]


def _ticks(*seconds: float) -> list[str]:
    return [tick_name(T0 + s) for s in seconds]


EVERY_SECOND = Schedule(name="beat", type="email", every=1.0)


def test_a_new_schedule_fires_nothing_in_the_past_then_each_tick_once() -> None:
    clock = Clock(T0 + 0.5)
    broker = _broker(clock)
    scheduler, recorder = _scheduler(broker, EVERY_SECOND)
    scheduler.run_once()
    assert broker.read_values(["schedule:beat"]) == {"schedule:beat": tick_value(T0)}
    assert _fired(broker) == []

    clock.now = T0 + 1.01
    scheduler.run_once()
    scheduler.run_once()  # nothing more is due
    clock.now = T0 + 2.2
    scheduler.run_once()
    assert _fired(broker) == _ticks(1, 2)
    fired = recorder.named(EventName.SCHEDULE_FIRED)
    assert [e.tick for e in fired] == _ticks(1, 2)
    assert [round(e.lag_s or 0, 3) for e in fired] == [0.01, 0.2]
    assert len(recorder.named(EventName.TASK_PUBLISHED)) == 2


def test_the_pass_sleeps_until_the_next_tick() -> None:
    clock = Clock(T0 + 0.25)
    scheduler, _ = _scheduler(_broker(clock), EVERY_SECOND)
    assert scheduler.run_once() == pytest.approx(0.755)


def test_schedulers_sharing_a_broker_fire_each_tick_once() -> None:
    clock = Clock(T0 + 0.5)
    broker = _broker(clock)
    schedulers = [_scheduler(broker, EVERY_SECOND)[0] for _ in range(3)]
    for step in range(1, 30):
        clock.now = T0 + 0.5 + step * 0.37
        for scheduler in random.Random(step).sample(schedulers, 3):
            scheduler.run_once()
    assert _fired(broker) == _ticks(*range(1, 12))  # up to T0 + 11.23


@pytest.mark.parametrize(
    ("missed", "expected", "skipped"),
    [("once", [10], 8), ("all", list(range(2, 11)), 0), ("skip", [10], 8)],
)
def test_missed_ticks_follow_missed(missed: str, expected: list[int], skipped: int) -> None:
    clock = Clock(T0 + 1.5)
    broker = _broker(clock)
    schedule = Schedule(name="beat", type="email", every=1.0, missed=missed)  # type: ignore[arg-type]
    scheduler, recorder = _scheduler(broker, schedule)
    scheduler.run_once()  # marks tick 1 fired
    clock.now = T0 + 10.3  # ticks 2..10 passed while no scheduler ran
    scheduler.run_once()
    assert _fired(broker) == _ticks(*expected)
    details = [e.detail for e in recorder.named(EventName.SCHEDULE_MISSED)]
    assert details == ([f"{skipped} tick(s) not fired (missed: {missed})"] if skipped else [])


def test_skip_leaves_out_a_latest_tick_later_than_its_grace() -> None:
    clock = Clock(T0 + 10)
    broker = _broker(clock)
    schedule = Schedule(name="beat", type="email", every=120.0, missed="skip")
    scheduler, _ = _scheduler(broker, schedule)
    scheduler.run_once()
    clock.now = T0 + 120 + 61  # 61 s late: past min(120 s, 60 s)
    scheduler.run_once()
    assert _fired(broker) == []
    assert broker.read_values(["schedule:beat"]) == {"schedule:beat": tick_value(T0 + 120)}
    clock.now = T0 + 240 + 59
    scheduler.run_once()
    assert _fired(broker) == _ticks(240)


def test_a_full_broker_leaves_the_tick_unfired_until_there_is_room() -> None:
    clock = Clock(T0 + 0.5)
    broker = _broker(clock, capacity=1)
    scheduler, recorder = _scheduler(broker, EVERY_SECOND)
    scheduler.run_once()
    broker.put_many([Task(type="other", payload=None)])
    clock.now = T0 + 1.1
    assert scheduler.run_once() <= 1.0  # tried again within a second
    assert broker.read_values(["schedule:beat"]) == {"schedule:beat": tick_value(T0)}
    assert len(recorder.named(EventName.SCHEDULE_FULL)) == 1

    broker.ack(broker.get({"other": 1}, 1, 0)[0])
    scheduler.run_once()
    assert _fired(broker) == _ticks(1)


def test_jitter_only_moves_not_before_later() -> None:
    clock = Clock(T0 + 0.5)
    broker = _broker(clock)
    schedule = Schedule(name="beat", type="email", every=10.0, jitter=3.0)
    scheduler, _ = _scheduler(broker, schedule)
    scheduler.run_once()
    clock.now = T0 + 10.001
    scheduler.run_once()
    assert broker.depth()["email"].delayed == 1
    clock.now = T0 + 13.001
    (delivery,) = broker.get({"email": 1}, 1, 0)
    assert T0 + 10 <= delivery.task.not_before <= T0 + 13
    assert delivery.task.headers["tick"] == tick_name(T0 + 10)  # named by its nominal time


def test_cron_ticks_are_read_in_the_schedules_timezone() -> None:
    nightly = Schedule(name="n", type="email", cron="0 3 * * *", timezone="Europe/Berlin")
    berlin = ZoneInfo("Europe/Berlin")
    winter = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc).timestamp()
    latest = datetime.fromtimestamp(nightly.latest(winter), berlin)
    assert (latest.hour, latest.minute, latest.day) == (3, 0, 4)
    assert datetime.fromtimestamp(nightly.latest(winter), timezone.utc).hour == 2
    assert nightly.next_after(nightly.latest(winter)) - nightly.latest(winter) == 86_400
    # A tick exactly now is the latest, and the next is strictly later.
    assert nightly.latest(nightly.latest(winter)) == nightly.latest(winter)


def test_cron_with_seconds_fires_through_the_scheduler() -> None:
    clock = Clock(T0 + 0.5)
    broker = _broker(clock)
    every_ten = Schedule(name="c", type="email", cron="* * * * * */10")
    scheduler, _ = _scheduler(broker, every_ten)
    scheduler.run_once()
    clock.now = T0 + 21
    scheduler.run_once()
    assert _fired(broker) == _ticks(20)


def test_stored_schedules_the_file_no_longer_names_are_deleted() -> None:
    clock = Clock(T0 + 0.5)
    broker = _broker(clock)
    old, _ = _scheduler(broker, EVERY_SECOND, Schedule(name="gone", type="email", every=5.0))
    old.run_once()
    assert set(broker.scan_values("schedule:")) == {"schedule:beat", "schedule:gone"}
    new, recorder = _scheduler(broker, EVERY_SECOND)
    assert new.forget_removed() == ["gone"]
    assert set(broker.scan_values("schedule:")) == {"schedule:beat"}
    assert [e.schedule for e in recorder.named(EventName.SCHEDULE_REMOVED)] == ["gone"]


def test_a_clock_off_the_brokers_is_warned_about() -> None:
    broker = _broker(Clock(time.time() + 5))
    scheduler, recorder = _scheduler(broker, EVERY_SECOND)
    scheduler.run_once()
    (skew,) = recorder.named(EventName.SCHEDULE_CLOCK_SKEW)
    assert skew.lag_s == pytest.approx(-5, abs=0.5)
    scheduler.run_once()  # once a minute at most
    assert len(recorder.named(EventName.SCHEDULE_CLOCK_SKEW)) == 1

    in_step, quiet = _scheduler(_broker(Clock(time.time())), EVERY_SECOND)
    in_step.run_once()
    assert quiet.named(EventName.SCHEDULE_CLOCK_SKEW) == []


def test_ticks_read_back_from_their_key_are_the_same_tick() -> None:
    """A fractional interval's ticks survive the trip through their key's text: a tick read
    back is not found due again (which would fire it twice)."""
    schedule = Schedule(name="b", type="email", every=0.3)
    now = T0 + 123.456
    latest = schedule.latest(now)
    assert float(tick_value(latest)) == latest
    assert schedule.latest(float(tick_value(latest))) == latest
    assert schedule.next_after(float(tick_value(latest))) > latest
