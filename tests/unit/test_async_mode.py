"""execution: async (issue 20): async def handlers awaited on the worker's event loop, limited by
their type's concurrency (coroutines in flight, not threads), with real timeouts, a blocked loop
reported, shutdown that hands running coroutines back, and validation both ways."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from runner import PipelineConfig, build_runtime
from runner.brokers.base import DeadLetterFilter
from runner.config.load import load_config
from runner.errors import ConfigError
from tests.unit import aio_handlers as async_handlers
from tests.unit.engine_kit import Recorder

H = "tests.unit.aio_handlers"


def _config(kind: str, tmp_path: Path, types: dict[str, Any], **more: Any) -> PipelineConfig:
    broker = {"kind": "sqlite", "path": str(tmp_path / "q.db")} if kind == "sqlite" else {}
    return PipelineConfig.model_validate(
        {"broker": broker, "retry": {"max_attempts": 1}, "task_types": types, **more}
    )


@pytest.fixture(autouse=True)
def _reset() -> None:
    async_handlers.reset()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_async_tasks_run_concurrently_without_taking_threads(kind: str, tmp_path: Path) -> None:
    """1,000 coroutines of 0.2 s with concurrency 500 on a process of 2 threads: as many as 500
    in flight at once (threads would allow 2), never more, and done in seconds (on 2 threads:
    100 s); a thread type beside them keeps its own threads."""
    config = _config(
        kind,
        tmp_path,
        {
            "io": {"handler": f"{H}:nap", "execution": "async", "concurrency": 500},
            "cpu": {"handler": f"{H}:plain"},
        },
        workers=2,
        results={"ttl": 60},
    )
    with build_runtime(config, observe=False) as runner:
        t0 = time.monotonic()
        ids = runner.publish_many([("io", {"s": 0.2, "n": i}) for i in range(1000)])
        runner.publish_many([("cpu", {"s": 0.05})] * 4)
        assert runner.run_until_empty(timeout=60) is True
        elapsed = time.monotonic() - t0
        assert runner.result(ids[7]) == {
            "state": "succeeded",
            "value": {"s": 0.2, "n": 7},
            "finished_at": runner.result(ids[7])["finished_at"],  # type: ignore[index]
        }
        summary = runner.summary.to_dict()
    assert 100 <= async_handlers.most <= 500
    assert elapsed < 30, elapsed
    assert summary["by_type"]["io"]["succeeded"] == 1000
    assert summary["by_type"]["cpu"]["succeeded"] == 4


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_timeout_cancels_the_coroutine(kind: str, tmp_path: Path) -> None:
    config = _config(
        kind,
        tmp_path,
        {
            "slow": {"handler": f"{H}:nap", "execution": "async", "timeout": 0.3},
            "polite": {
                "handler": f"{H}:polite",
                "execution": "async",
                "timeout": 0.3,
                "timeout_action": "cancel",
            },
        },
    )
    recorder = Recorder()
    with build_runtime(config, observe=False, listeners=[recorder]) as runner:
        slow = runner.publish("slow", {"s": 30})
        polite = runner.publish("polite", {})
        t0 = time.monotonic()
        assert runner.run_until_empty(timeout=30) is True
        assert time.monotonic() - t0 < 10
        dead = {r.id: r for r in runner.broker.dead_letters(DeadLetterFilter())}  # type: ignore[attr-defined]
    assert async_handlers.cancelled == [slow]  # cancelled for real, at its await
    assert sorted(async_handlers.saw_cancelled) == sorted([slow, polite])  # ctx.cancelled set
    assert dead[slow].error_type == dead[polite].error_type == "TimeoutError"
    timeouts = {e.task_id: e.detail for e in recorder.named("task.timeout")}
    assert timeouts == {slow: "interrupt", polite: "cancel"}


def test_a_blocked_loop_is_reported_with_the_task(tmp_path: Path) -> None:
    config = _config("memory", tmp_path, {"bad": {"handler": f"{H}:blocker", "execution": "async"}})
    recorder = Recorder()
    with build_runtime(config, observe=False, listeners=[recorder]) as runner:
        task_id = runner.publish("bad", {"s": 1.6})
        assert runner.run_until_empty(timeout=30) is True
    (overrun,) = recorder.named("task.overrun")
    assert overrun.task_id == task_id
    assert "blocked the event loop" in (overrun.detail or "")


def test_stop_hands_running_coroutines_back(tmp_path: Path) -> None:
    """Past the grace period, coroutines still running are cancelled and their tasks handed
    back (queued again on SQLite, not failed)."""
    config = _config(
        "sqlite", tmp_path, {"io": {"handler": f"{H}:nap", "execution": "async", "timeout": 60}}
    )
    runner = build_runtime(config, observe=False)
    runner.start()
    runner.publish_many([("io", {"s": 30})] * 3)
    deadline = time.monotonic() + 10
    while async_handlers.running < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    runner.stop(grace_s=0.3)
    assert time.monotonic() - t0 < 5
    assert sorted(async_handlers.cancelled) != []
    again = build_runtime(config, observe=False)
    try:
        depth = again.broker.depth()["io"]
        assert depth.ready == 3, depth  # handed back, not dead, not leased
        assert again.broker.dead_letters(DeadLetterFilter()) == []  # type: ignore[attr-defined]
    finally:
        again.broker.close()


def test_apublish_from_asyncio(tmp_path: Path) -> None:
    config = _config("memory", tmp_path, {"io": {"handler": f"{H}:nap", "execution": "async"}})
    with build_runtime(config, observe=False) as runner:
        task_id = asyncio.run(runner.apublish("io", {"s": 0}, delay_s=0.01))
        assert isinstance(task_id, str)
        assert runner.run_until_empty(timeout=30) is True
        assert runner.summary.to_dict()["by_type"]["io"]["succeeded"] == 1


def test_the_handler_must_match_the_execution(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "task_types:\n"
        "  a:\n"
        f"    handler: {H}:nap\n"
        "  b:\n"
        "    execution: async\n"
        f"    handler: {H}:plain\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    found = [str(p) for p in info.value.problems]
    assert len(found) == 2, found
    assert found[0].startswith(f"{path}:3:") and "is an async def" in found[0]
    assert "set execution: async" in found[0]
    assert found[1].startswith(f"{path}:6:") and "is a plain def" in found[1]
    assert "make it an async def, or use execution: thread" in found[1]
