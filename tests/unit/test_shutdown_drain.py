"""A publish blocked on a full memory queue at shutdown must not put its tasks after the
drain (issue 17: the demo's Ctrl-C published 1,100 tasks and accounted for 1,000)."""

from __future__ import annotations

import threading
import time

import pytest

from runner.brokers.memory import MemoryBroker
from runner.deadletter.memory import MemoryDeadLetters
from runner.errors import BrokerClosed
from runner.model import Task
from tests.unit.engine_kit import wait_until


class _LateWaker(threading.Condition):
    """A condition whose waiters take a while to run again once woken: what a busy machine
    does to a producer thread, made certain."""

    def wait(self, timeout: float | None = None) -> bool:
        woken = super().wait(timeout)
        if threading.current_thread().name == "producer":
            self.release()
            try:
                time.sleep(0.2)
            finally:
                self.acquire()
        return woken


def test_a_put_waiting_for_room_fails_once_closed_even_if_the_drain_made_room() -> None:
    store = MemoryDeadLetters()
    broker = MemoryBroker(
        capacity=2, enqueue_timeout=10, overflow="block", visibility_timeout=30,
        dead_letters=store,
    )  # fmt: skip
    broker._cond = _LateWaker(threading.Lock())
    broker.put_many([Task(type="t", payload=i) for i in range(2)])
    raised: list[BaseException] = []

    def produce() -> None:
        try:
            broker.put_many([Task(type="t", payload="late")])
        except BaseException as exc:
            raised.append(exc)

    producer = threading.Thread(target=produce, name="producer")
    producer.start()
    wait_until(lambda: broker._put_waiting > 0, "the producer waits for room")
    broker.close()  # what Runner.stop does first, then the drain
    drained = broker.drain_to_dead_letters(reason="shutdown", include_leased=True)
    producer.join(5)
    assert len(drained) == 2
    assert len(raised) == 1 and isinstance(raised[0], BrokerClosed)
    assert broker.drain_to_dead_letters(reason="shutdown") == []  # nothing slipped in after


@pytest.mark.parametrize("tasks", [3000])
def test_a_run_stopped_while_its_producer_waits_for_room_accounts_for_every_task(
    tasks: int,
) -> None:
    from runner.app import build_runtime
    from runner.config.models import PipelineConfig
    from runner.events import Event

    config = PipelineConfig.model_validate(
        {
            "broker": {"kind": "memory", "capacity": 50},
            "workers": 2,
            "task_types": {"work": {"handler": "handlers.demo:send_email", "timeout": "5s"}},
            "metrics": {"enabled": False},
            "simulate": {"tasks": tasks, "mix": {"work": 1},
                         "faults": {"work": {"latency": ["5ms", "10ms"]}}},
        }
    )  # fmt: skip
    seen: dict[str, set[str]] = {"published": set(), "finished": set()}

    class Ids:
        def handle(self, event: Event) -> None:
            if event.name == "task.published" and event.task_id:
                seen["published"].add(event.task_id)
            elif event.name in ("task.succeeded", "task.dead") and event.task_id:
                seen["finished"].add(event.task_id)

    runner = build_runtime(config, observe=False, listeners=[Ids()])
    runner.start()
    stop = threading.Event()

    def produce() -> None:
        try:
            while not stop.is_set():
                runner.publish_many([("work", {"to": "a@example.com"})] * 25)
        except BrokerClosed:
            pass

    producer = threading.Thread(target=produce, name="producer")
    producer.start()
    broker = runner.broker
    assert isinstance(broker, MemoryBroker)
    wait_until(lambda: broker._put_waiting > 0, "the queue is full and the producer waits for room")
    stop.set()
    runner.stop(grace_s=0.0)
    producer.join(10)
    assert seen["published"] and seen["published"] == seen["finished"]
