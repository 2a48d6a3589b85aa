"""Prometheus metrics: a known workload of events, scraped over HTTP, must read back exactly."""

from __future__ import annotations

import logging
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from runner.brokers.base import Bucket, Circuit, Depth
from runner.config.models import MetricsConfig
from runner.errors import RunnerError
from runner.events import Event, EventBus
from runner.observe.logs import FIELDS_ATTR
from runner.observe.metrics import MetricsListener


class FakeState:
    def __init__(self) -> None:
        self.depth_by_type = {"email": Depth(ready=4, delayed=2, leased=1), "resize": Depth()}
        self.running = {"email": 2, "resize": 0}
        self.limit = {"email": 2, "resize": 1}
        self.dead_count: int | None = 3
        self.fail = False
        self.bucket_by_type: dict[str, Bucket] = {}
        self.circuit_by_type: dict[str, Circuit] = {}

    def depth(self) -> dict[str, Depth]:
        if self.fail:
            raise ConnectionError("broker down")
        return dict(self.depth_by_type)

    def inflight(self) -> dict[str, int]:
        return dict(self.running)

    def limits(self) -> dict[str, int]:
        return dict(self.limit)

    def dead_letter_count(self) -> int | None:
        return self.dead_count

    def overrunning(self) -> int:
        return 0

    def buckets(self) -> dict[str, Bucket]:
        return dict(self.bucket_by_type)

    def circuits(self) -> dict[str, Circuit]:
        return dict(self.circuit_by_type)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def run_workload(bus: EventBus) -> dict[str, int]:
    """Email: 5 published, 3 ok at once, 1 ok after a retry, 1 dead after 2 timeouts."""
    emit = bus.emit
    for i in range(5):
        emit(Event("task.published", task_id=f"e{i}", type="email"))
    emit(Event("task.published", task_id="r0", type="resize"))
    for i in range(3):
        emit(Event("task.started", task_id=f"e{i}", type="email", attempt=1, queue_wait_s=0.002))
        emit(Event("task.succeeded", task_id=f"e{i}", type="email", attempt=1, duration_s=0.03))
    emit(Event("task.started", task_id="e3", type="email", attempt=1, queue_wait_s=0.002))
    emit(Event("task.retrying", task_id="e3", type="email", attempt=1, duration_s=0.2,
               delay_s=0.05, error="OSError: x"))  # fmt: skip
    emit(Event("task.started", task_id="e3", type="email", attempt=2, queue_wait_s=0.06))
    emit(Event("task.succeeded", task_id="e3", type="email", attempt=2, duration_s=0.03))
    emit(Event("task.started", task_id="e4", type="email", attempt=1, queue_wait_s=0.5))
    emit(Event("task.timeout", task_id="e4", type="email", attempt=1))
    emit(Event("task.interrupted", task_id="e4", type="email", attempt=1))
    emit(Event("task.retrying", task_id="e4", type="email", attempt=1, duration_s=2.0))
    emit(Event("task.started", task_id="e4", type="email", attempt=2, queue_wait_s=0.5))
    emit(Event("task.timeout", task_id="e4", type="email", attempt=2))
    emit(Event("task.interrupted", task_id="e4", type="email", attempt=2))
    emit(Event("task.overrun", task_id="e4", type="email", attempt=2))
    emit(Event("task.dead", task_id="e4", type="email", attempt=2, duration_s=2.0,
               reason="exhausted", error="TimeoutError: 2s"))  # fmt: skip
    emit(Event("task.dead", task_id="r0", type="resize", reason="undecodable"))
    emit(Event("task.dead", task_id="r1", type="resize", reason="expired"))
    emit(Event("task.lease_lost", task_id="e3", type="email", attempt=2))
    emit(Event("broker.reconnecting", detail="attempt 1"))
    emit(Event("broker.reconnecting", detail="attempt 2"))
    return {"published": 5, "started": 7, "succeeded": 4, "retried": 2, "timeouts": 2}


@pytest.fixture
def metrics():
    made: list[MetricsListener] = []

    def make(state: FakeState | None = None, enabled: bool = True) -> MetricsListener:
        listener = MetricsListener(
            MetricsConfig(enabled=enabled, host="127.0.0.1", port=0), state or FakeState()
        )
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.close()


def test_scraped_counts_equal_the_emitted_workload(metrics) -> None:
    listener = metrics()
    listener.start()
    assert listener.port
    bus = EventBus([listener])
    expected = run_workload(bus)
    assert bus.listener_errors == 0

    found = samples(scrape(listener.port))
    assert value(found, "dq_tasks_published_total", type="email") == expected["published"]
    assert value(found, "dq_tasks_published_total", type="resize") == 1
    assert value(found, "dq_tasks_started_total", type="email") == expected["started"]
    assert value(found, "dq_tasks_succeeded_total", type="email") == expected["succeeded"]
    assert value(found, "dq_tasks_succeeded_total", type="resize") == 0  # pre-created series
    assert value(found, "dq_tasks_retried_total", type="email") == expected["retried"]
    assert value(found, "dq_tasks_timed_out_total", type="email") == expected["timeouts"]
    assert value(found, "dq_interrupts_total", type="email") == 2
    assert value(found, "dq_overruns_total", type="email") == 1
    assert value(found, "dq_lease_lost_total", type="email") == 1
    assert value(found, "dq_broker_reconnects_total") == 2
    assert value(found, "dq_tasks_dead_total", type="email", reason="exhausted") == 1
    assert value(found, "dq_tasks_dead_total", type="resize", reason="undecodable") == 1
    assert value(found, "dq_tasks_dead_total", type="resize", reason="expired") == 1
    assert value(found, "dq_tasks_expired_total", type="resize") == 1
    assert value(found, "dq_tasks_expired_total", type="email") == 0  # pre-created series
    # 4 successes + 2 retried attempts + 1 dead attempt with a duration; the resize dead had none.
    assert value(found, "dq_task_duration_seconds_count", type="email") == 7
    assert value(found, "dq_task_duration_seconds_sum", type="email") == pytest.approx(
        4 * 0.03 + 0.2 + 2.0 + 2.0
    )
    assert value(found, "dq_task_duration_seconds_bucket", type="email", le="0.05") == 4
    assert value(found, "dq_task_queue_wait_seconds_count", type="email") == 7
    assert value(found, "dq_task_queue_wait_seconds_bucket", type="email", le="0.01") == 4


def test_gauges_are_read_from_state_at_scrape_time(metrics) -> None:
    state = FakeState()
    listener = metrics(state)
    listener.start()
    found = samples(scrape(listener.port))
    assert value(found, "dq_queue_depth", type="email", state="ready") == 4
    assert value(found, "dq_queue_depth", type="email", state="delayed") == 2
    assert value(found, "dq_queue_depth", type="email", state="leased") == 1
    assert value(found, "dq_queue_depth", type="resize", state="ready") == 0
    assert value(found, "dq_tasks_in_flight", type="email") == 2
    assert value(found, "dq_task_concurrency_limit", type="resize") == 1
    assert value(found, "dq_dead_letters") == 3
    assert value(found, "dq_worker_up") == 1

    state.running["email"] = 1
    state.dead_count = None  # a backend that cannot count: the gauge is left out
    listener.handle(Event("worker.stopping", reason="signal"))
    found = samples(scrape(listener.port))
    assert value(found, "dq_tasks_in_flight", type="email") == 1
    assert ("dq_dead_letters", frozenset()) not in found
    assert value(found, "dq_worker_up") == 0


def test_a_failing_state_does_not_fail_the_scrape(metrics) -> None:
    state = FakeState()
    listener = metrics(state)
    listener.start()
    listener.handle(Event("task.published", task_id="a", type="email"))
    state.fail = True
    found = samples(scrape(listener.port))
    assert value(found, "dq_tasks_published_total", type="email") == 1
    assert value(found, "dq_worker_up") == 1
    assert not any(name == "dq_queue_depth" for name, _ in found)


def test_private_registry_and_two_listeners_side_by_side(metrics) -> None:
    a, b = metrics(), metrics()
    a.handle(Event("task.published", task_id="x", type="email"))
    assert value(samples(a.exposition().decode()), "dq_tasks_published_total", type="email") == 1
    assert value(samples(b.exposition().decode()), "dq_tasks_published_total", type="email") == 0
    assert REGISTRY.get_sample_value("dq_tasks_published_total", {"type": "email"}) is None


def test_disabled_serves_nothing_and_close_stops_the_server(metrics) -> None:
    off = metrics(enabled=False)
    off.start()
    assert off.port is None

    on = metrics()
    on.start()
    port = on.port
    assert scrape(port)
    on.close()
    on.close()
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_port_in_use_is_a_runner_error(metrics) -> None:
    first = metrics()
    first.start()
    taken = MetricsListener(
        MetricsConfig(enabled=True, host="127.0.0.1", port=first.port), FakeState()
    )
    with pytest.raises(RunnerError, match="cannot listen"):
        taken.start()


def test_concurrent_emitters_lose_no_counts(metrics) -> None:
    listener = metrics()
    bus = EventBus([listener])

    def work() -> None:
        for i in range(500):
            bus.emit(Event("task.succeeded", task_id=str(i), type="email", duration_s=0.001))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    found = samples(listener.exposition().decode())
    assert value(found, "dq_tasks_succeeded_total", type="email") == 2000
    assert value(found, "dq_task_duration_seconds_count", type="email") == 2000


def test_write_exposition_for_promtool(metrics) -> None:
    """.ci/run sets DQ_EXPOSITION_OUT and feeds the file to `promtool check metrics`."""
    listener = metrics()
    run_workload(EventBus([listener]))
    text = listener.exposition()
    assert b"# TYPE dq_tasks_published_total counter" in text
    target = os.environ.get("DQ_EXPOSITION_OUT")
    if target:
        Path(target).write_bytes(text)


class QueryLog(FakeState):
    """A FakeState that records every read, so a swallowed exception cannot hide one."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def depth(self) -> dict[str, Depth]:
        self.calls.append("depth")
        return super().depth()

    def inflight(self) -> dict[str, int]:
        self.calls.append("inflight")
        return super().inflight()

    def limits(self) -> dict[str, int]:
        self.calls.append("limits")
        return super().limits()

    def dead_letter_count(self) -> int | None:
        self.calls.append("dead_letter_count")
        return super().dead_letter_count()

    def overrunning(self) -> int:
        self.calls.append("overrunning")
        return super().overrunning()


def test_construction_does_not_query_the_broker(metrics) -> None:
    state = QueryLog()
    state.fail = True  # as when Redis is down at start-up
    listener = metrics(state)
    # limits() is config (the per-type concurrency), read once to pre-create the series; the
    # broker-backed reads must wait for the first scrape. Checked on the log, not on an
    # exception: collect() swallows the state's exceptions, so a raise would prove nothing.
    assert state.calls == ["limits"]
    assert b"dq_tasks_published_total" in listener.exposition()
    assert state.calls[1:] == ["depth"]  # the scrape does read it, and survives the failure


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(getattr(record, FIELDS_ATTR, {}).get("event", ""))


@pytest.fixture
def metrics_log():
    logger = logging.getLogger("runner.metrics")
    handler, level = LogLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_state_failures_are_counted_and_logged_once_per_spell(metrics, metrics_log) -> None:
    state = FakeState()
    listener = metrics(state)

    def scrape_errors() -> float:
        found = samples(listener.exposition().decode())
        return value(found, "dq_metrics_state_errors_total")

    assert scrape_errors() == 0
    state.fail = True
    assert [scrape_errors() for _ in range(3)] == [1, 2, 3]
    assert metrics_log.events == ["metrics.state_failed"]  # one line for the spell, not three
    state.fail = False
    assert scrape_errors() == 3
    assert scrape_errors() == 3
    assert metrics_log.events == ["metrics.state_failed", "metrics.state_recovered"]
    state.fail = True  # a second spell is news again
    assert scrape_errors() == 4
    assert metrics_log.events == [
        "metrics.state_failed",
        "metrics.state_recovered",
        "metrics.state_failed",
    ]


def test_schedule_fires_are_counted_and_their_lag_kept_per_schedule() -> None:
    listener = MetricsListener(
        MetricsConfig(enabled=False), FakeState(), schedules=["heartbeat", "nightly"]
    )
    bus = EventBus([listener])
    bus.emit(Event("schedule.fired", type="email", schedule="heartbeat", lag_s=0.25))
    bus.emit(Event("schedule.fired", type="email", schedule="heartbeat", lag_s=0.01))
    found = samples(listener.exposition().decode())
    assert value(found, "dq_schedule_fires_total", schedule="heartbeat") == 2
    assert value(found, "dq_schedule_fires_total", schedule="nightly") == 0  # pre-created
    assert value(found, "dq_schedule_lag_seconds", schedule="heartbeat") == 0.01  # the last one


def test_rate_limited_types_report_their_bucket_from_the_broker() -> None:
    state = FakeState()
    listener = MetricsListener(MetricsConfig(enabled=False), state)
    found = samples(listener.exposition().decode())
    assert not any(name == "dq_rate_limited_seconds_total" for name, _ in found)  # none limited
    state.bucket_by_type = {"email": Bucket(tokens=2.5, at=0.0, limited_s=7.25)}
    found = samples(listener.exposition().decode())
    assert value(found, "dq_rate_limited_seconds_total", type="email") == 7.25
    assert value(found, "dq_rate_limit_tokens", type="email") == 2.5


def test_circuit_states_are_a_gauge_per_type() -> None:
    state = FakeState()
    listener = MetricsListener(MetricsConfig(enabled=False), state)
    state.circuit_by_type = {
        "email": Circuit("open", since=0.0, window_start=0.0),
        "resize": Circuit("half_open", since=0.0, window_start=0.0),
    }
    found = samples(listener.exposition().decode())
    assert value(found, "dq_circuit_state", type="email") == 2
    assert value(found, "dq_circuit_state", type="resize") == 1
