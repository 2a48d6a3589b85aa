"""runner.ops.bench: option parsing, payload planning, the recorder, and one small real run."""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from runner.config.models import PipelineConfig
from runner.errors import UsageError
from runner.events import Event
from runner.middleware.simulate import SIM_HEADER
from runner.ops.bench import (
    BenchOptions,
    BenchRecorder,
    _produce,
    parse_rate,
    parse_seconds,
    payloads,
    run_bench,
)

HANDLERS = Path(__file__).resolve().parents[2] / "benchmarks"


def _config(**extra: object) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "broker": {"kind": "memory", "capacity": 10_000},
            "workers": 2,
            "handler_paths": [str(HANDLERS)],
            "task_types": {
                "a": {"handler": "bench_handlers:noop"},
                "b": {"handler": "bench_handlers:noop"},
            },
            **extra,
        }
    )


@pytest.mark.parametrize(
    ("text", "expected"), [("500/s", 500.0), ("30/m", 0.5), ("7200/h", 2.0), ("max", None)]
)
def test_parse_rate(text: str, expected: float | None) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["500", "0/s", "-1/s", "5/x", ""])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_rate(text)


def test_parse_seconds() -> None:
    assert parse_seconds("250ms") == 0.25
    assert parse_seconds("2m") == 120.0
    for bad in ("0s", "soon", "-1s"):
        with pytest.raises(UsageError):
            parse_seconds(bad)


def test_payloads_without_simulate_are_empty_and_cycle_types() -> None:
    items = list(itertools.islice(payloads(_config(), ()), 4))
    assert items == [("a", {}), ("b", {}), ("a", {}), ("b", {})]
    assert {t for t, _ in itertools.islice(payloads(_config(), ("b",)), 5)} == {"b"}


def test_payloads_use_the_simulate_fault_plan() -> None:
    config = _config(simulate={"tasks": 1, "mix": {"a": 1}, "faults": {"a": {"failure_rate": 0.5}}})
    items = list(itertools.islice(payloads(config, ()), 200))
    assert {item[0] for item in items} == {"a"}
    assert all(item[1] == {"n": item[2][SIM_HEADER]["n"]} for item in items)  # plan not in it
    plans = [item[2][SIM_HEADER] for item in items]
    assert any(plan["fail_attempts"] > 0 for plan in plans)
    assert any(plan["fail_attempts"] == 0 for plan in plans)


def test_unknown_type_is_a_usage_error_before_anything_runs() -> None:
    with pytest.raises(UsageError, match="unknown task type 'c'"):
        payloads(_config(), ("c",))


def test_recorder_counts_first_attempt_waits_and_finishes() -> None:
    recorder = BenchRecorder()
    recorder.handle(Event("task.started", type="a", attempt=1, queue_wait_s=0.002))
    recorder.handle(Event("task.started", type="a", attempt=2, queue_wait_s=0.5))
    recorder.handle(Event("task.retrying", type="a", attempt=1))
    recorder.handle(Event("task.succeeded", type="a", attempt=2))
    recorder.expect(2)
    assert not recorder.wait_finished(0)
    recorder.handle(Event("task.dead", type="b", attempt=1))
    assert recorder.wait_finished(0)
    assert recorder.waits == {"a": [0.002]}
    assert (recorder.finished["a"], recorder.dead["b"], recorder.retried["a"]) == (1, 1, 1)


def test_run_bench_publishes_paced_and_reports_per_type() -> None:
    started = time.monotonic()
    report = run_bench(_config(), BenchOptions(rate=200.0, duration_s=5.0, tasks=40))
    elapsed = time.monotonic() - started
    # 40 tasks at 200/s cannot be published in less than ~0.2 s: the rate is honoured.
    assert report.publish_s >= 0.15
    assert elapsed < 15
    assert report.published == report.finished == 40
    assert [t.name for t in report.types] == ["a", "b"]
    assert [t.published for t in report.types] == [20, 20]
    for t in report.types:
        assert t.finished == 20
        assert 0 <= t.wait_ms["p50"] <= t.wait_ms["p99"] <= t.wait_ms["max"]
    assert threading.active_count() < 20  # the runner's threads were stopped


def test_recorder_expect_can_be_raised_again() -> None:
    recorder = BenchRecorder()
    recorder.expect(1)
    recorder.handle(Event("task.succeeded", type="a", attempt=1))
    assert recorder.wait_finished(0)
    recorder.expect(2)
    assert not recorder.wait_finished(0)
    recorder.handle(Event("task.succeeded", type="a", attempt=1))
    assert recorder.wait_finished(0)


class _CountingRunner:
    """Stands in for the Runner in _produce: records how the tasks were handed over."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def publish(self, type_name: str, payload: object, headers: object = None) -> str:
        self.calls.append(("publish", 1))
        return "id"

    def publish_many(self, items: list[object]) -> list[str]:
        self.calls.append(("publish_many", len(items)))
        return ["id"] * len(items)


@pytest.mark.parametrize(("mode", "expected"), [("call", {"publish"}), ("batch", {"publish_many"})])
def test_publish_mode_call_makes_one_publish_per_task(mode: str, expected: set[str]) -> None:
    runner = _CountingRunner()
    counts: dict[str, int] = defaultdict(int)
    options = BenchOptions(rate=None, duration_s=5.0, tasks=450, publish_mode=mode)  # type: ignore[arg-type]
    sent = _produce(runner, payloads(_config(), ()), options, counts)
    assert sent == sum(n for _, n in runner.calls) == 450
    assert {kind for kind, _ in runner.calls} == expected
    if mode == "batch":
        assert len(runner.calls) < 10  # up to 200 per call
    assert sum(counts.values()) == 450
