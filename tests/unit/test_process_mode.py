"""execution: process (issue 20): handlers in child processes, one task at a time each, with hard
timeouts (SIGTERM, then SIGKILL after kill_grace), a dying child failing only its own attempt,
recycling by task count and memory, JSON across the pipe, the child's log lines in the
parent's stream, a clean stop and no orphan; on the memory and SQLite brokers."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from runner import PipelineConfig, build_runtime
from runner.app import Runner
from runner.backends import create_broker
from runner.brokers.base import DeadLetterFilter
from runner.config.load import load_config
from runner.engine.processes import ProcessWorker
from runner.errors import ConfigError
from runner.middleware.simulate import SIM_HEADER
from runner.model import DeadLetter, DeadReason
from runner.observe.logs import FIELDS_ATTR, task_logger
from tests.unit.engine_kit import Recorder

H = "tests.unit.proc_handlers"
BROKERS = ["memory", "sqlite"]


#: The crash and timeout cases run on Redis too.
WITH_REDIS = [*BROKERS, pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture
def on(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """The broker settings of the test's ``kind`` (a Redis namespace on the session's server)."""
    kind = request.node.callspec.params["kind"]
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        namespace = request.getfixturevalue("redis_namespace")
        return {"kind": "redis", "url": server.url, "namespace": namespace}
    return {"kind": "sqlite", "path": str(tmp_path / "q.db")} if kind == "sqlite" else {}


def _config(kind: str, tmp_path: Path, types: dict[str, Any], **more: Any) -> PipelineConfig:
    broker: dict[str, Any] = (
        {"kind": "sqlite", "path": str(tmp_path / "q.db")} if kind == "sqlite" else {}
    )
    broker.update(more.pop("broker", {}))
    for spec in types.values():
        spec.setdefault("execution", "process")
    return PipelineConfig.model_validate(
        {"broker": broker, "retry": {"max_attempts": 1}, "task_types": types, **more}
    )


def _children(runner: Runner) -> list[int]:
    return [pid for w in runner.workers if isinstance(w, ProcessWorker) for pid in w.children()]


def _dead(runner: Runner) -> dict[str, DeadLetter]:
    return {r.id: r for r in runner.broker.dead_letters(DeadLetterFilter())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.mark.parametrize("kind", BROKERS)
def test_tasks_run_in_children_with_json_results(kind: str, tmp_path: Path) -> None:
    """Two children run the tasks (neither is the test's process); results come back as JSON,
    a pydantic payload is validated in both processes, the summary counts them."""
    config = _config(
        kind,
        tmp_path,
        {
            "work": {"handler": f"{H}:whoami", "concurrency": 2},
            "ship": {"handler": f"{H}:ship", "concurrency": 1},
        },
        results={"ttl": 60},
    )
    with build_runtime(config, observe=False) as runner:
        _wait(lambda: len(_children(runner)) == 3)
        ids = runner.publish_many([("work", {"spin": 200_000, "n": i}) for i in range(20)])
        shipped = runner.publish("ship", {"order": 7})
        assert runner.run_until_empty(timeout=60) is True
        results = [runner.result(i) for i in ids]
        assert runner.result(shipped)["value"] == {"model": "Order", "order": 7}  # type: ignore[index]
        summary = runner.summary.to_dict()
    pids = {r["value"]["pid"] for r in results}  # type: ignore[index]
    assert os.getpid() not in pids
    assert len(pids) == 2
    assert results[3]["value"]["payload"] == {"spin": 200_000, "n": 3}  # type: ignore[index]
    assert summary["by_type"]["work"]["succeeded"] == 20


@pytest.mark.parametrize("kind", WITH_REDIS)
def test_a_timeout_kills_the_child_and_frees_the_slot(
    kind: str, on: dict[str, Any], tmp_path: Path
) -> None:
    """A handler asleep in a C call past its timeout: SIGTERM ends it (the attempt fails as
    timed out, the slot is free again within timeout + kill_grace + 1 s); one that ignores
    SIGTERM is SIGKILLed kill_grace later. Each time a new child takes the old one's place."""
    types = {"slow": {"handler": f"{H}:note_and_sleep", "concurrency": 1, "timeout": 0.5,
                      "kill_grace": 0.5}}  # fmt: skip
    with build_runtime(_config(kind, tmp_path, types, broker=on), observe=False) as runner:
        _wait(lambda: len(_children(runner)) == 1)
        first = _children(runner)[0]
        t0 = time.monotonic()
        gentle = runner.publish("slow", {"dir": str(tmp_path), "s": 30})
        stubborn = runner.publish("slow", {"dir": str(tmp_path), "s": 30, "ignore_term": True})
        quick = runner.publish("slow", {"dir": str(tmp_path), "s": 0})
        assert runner.run_until_empty(timeout=30) is True
        elapsed = time.monotonic() - t0
        dead = _dead(runner)
        assert _children(runner) and _children(runner)[0] != first
    # gentle: ~0.5 s; stubborn: 0.5 + 0.5 s; quick: at once; each restart well under 1 s.
    assert elapsed < 0.5 + (0.5 + 0.5) + 3 * 1.0 + 2.0, elapsed
    assert set(dead) == {gentle, stubborn}
    for record in dead.values():
        assert record.error_type == "TimeoutError"
        assert "its child process was killed" in record.message
    pids = [int(Path(tmp_path, f"{t}.pid").read_text()) for t in (gentle, stubborn)]
    assert not any(_alive(pid) for pid in pids)
    assert quick not in dead


def test_timeout_action_cancel_lets_the_child_return_and_keep_its_place(tmp_path: Path) -> None:
    types = {"polite": {"handler": f"{H}:polite", "concurrency": 1, "timeout": 0.3,
                        "timeout_action": "cancel"}}  # fmt: skip
    with build_runtime(_config("memory", tmp_path, types), observe=False) as runner:
        _wait(lambda: len(_children(runner)) == 1)
        child = _children(runner)[0]
        ids = runner.publish_many([("polite", None)] * 2)
        assert runner.run_until_empty(timeout=30) is True
        dead = _dead(runner)
        assert _children(runner) == [child]
    assert set(dead) == set(ids)
    assert all(r.error_type == "TimeoutError" for r in dead.values())
    assert all("killed" not in r.message for r in dead.values())


@pytest.mark.parametrize("kind", WITH_REDIS)
def test_a_dying_child_fails_only_its_own_attempt(
    kind: str, on: dict[str, Any], tmp_path: Path
) -> None:
    """A segfault and an os._exit: each task is dead-lettered with the exit signal or code;
    the worker lives on and the next task runs in a new child."""
    types = {
        "crash": {"handler": f"{H}:crash", "concurrency": 1},
        "work": {"handler": f"{H}:whoami", "concurrency": 1},
    }
    with build_runtime(_config(kind, tmp_path, types, broker=on), observe=False) as runner:
        segv = runner.publish("crash", {"how": "segfault"})
        exit5 = runner.publish("crash", {"how": "exit"})
        after = runner.publish_many([("work", {"n": i}) for i in range(5)])
        assert runner.run_until_empty(timeout=60) is True
        dead = _dead(runner)
        summary = runner.summary.to_dict()
    assert set(dead) == {segv, exit5}
    assert dead[segv].error_type == "ChildDied"
    assert "died of SIGSEGV" in dead[segv].message
    assert "exited with code 5" in dead[exit5].message
    assert summary["by_type"]["work"]["succeeded"] == len(after)


@pytest.mark.parametrize("kind", BROKERS)
def test_children_are_recycled_by_task_count_and_memory(kind: str, tmp_path: Path) -> None:
    types = {
        "counted": {"handler": f"{H}:whoami", "concurrency": 1, "max_tasks_per_child": 2},
        "hog": {"handler": f"{H}:hog", "concurrency": 1, "max_memory_per_child": "150MB"},
    }
    config = _config(kind, tmp_path, types, results={"ttl": 60})
    with build_runtime(config, observe=False) as runner:
        counted = [runner.publish("counted", {"n": i}) for i in range(6)]
        small = [runner.publish("hog", {"mb": 1}) for _ in range(2)]
        assert runner.run_until_empty(timeout=60) is True
        big = [runner.publish("hog", {"mb": 200}) for _ in range(2)]
        assert runner.run_until_empty(timeout=60) is True
        big.append(runner.publish("hog", {"mb": 1}))
        assert runner.run_until_empty(timeout=60) is True
        pids = [runner.result(i)["value"]["pid"] for i in counted]  # type: ignore[index]
        hogs = [runner.result(i)["value"] for i in (*small, *big)]  # type: ignore[index]
    assert len(set(pids)) == 3
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]
    # Small tasks share a child; a big one runs there too and leaves it above the limit, so
    # the next task has a new child (and so on).
    assert hogs[0] == hogs[1] == hogs[2] != hogs[3] != hogs[4]


@pytest.mark.parametrize("kind", BROKERS)
def test_exceptions_cross_as_their_own_class(kind: str, tmp_path: Path) -> None:
    """never_retry names a class the child raised; PermanentError is permanent; Retry(count=
    False) gives the attempt back; a plain error keeps the child's traceback."""
    types = {"fail": {"handler": f"{H}:fail", "concurrency": 1,
                      "retry": {"max_attempts": 3, "backoff": {"initial": 0.01},
                                "never_retry": [f"{H}:Refused"]}}}  # fmt: skip
    config = _config(kind, tmp_path, types, results={"ttl": 60})
    with build_runtime(config, observe=False) as runner:
        refused = runner.publish("fail", {"raise": "refused"})
        permanent = runner.publish("fail", {"raise": "permanent"})
        retried = runner.publish("fail", {"raise": "retry", "dir": str(tmp_path)})
        plain = runner.publish("fail", {"raise": "value", "n": 4})
        assert runner.run_until_empty(timeout=60) is True
        dead = _dead(runner)
        back = runner.result(retried)
    assert dead[refused].reason == DeadReason.NEVER_RETRY
    assert dead[refused].error_type == "Refused"
    assert dead[permanent].reason == DeadReason.PERMANENT
    assert dead[plain].reason == DeadReason.EXHAUSTED
    assert dead[plain].attempts == 3
    assert dead[plain].message == "bad value 4"
    assert "proc_handlers.py" in dead[plain].traceback
    assert 'raise ValueError(f"bad value' in dead[plain].traceback
    assert back is not None and back["value"] == 1  # its attempt was given back


@pytest.mark.parametrize("kind", BROKERS)
def test_the_childs_log_lines_reach_the_parent_with_the_task(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ctx.logger's lines (with their extra fields) and a module logger's (with its traceback)
    are logged in the parent by the task's logger: the task's fields on each."""
    types = {"chatty": {"handler": f"{H}:chatty", "concurrency": 1}}
    caplog.set_level(logging.INFO)
    config = _config(kind, tmp_path, types)
    broker = create_broker(config)
    with Runner(config, broker, task_logger=task_logger) as runner:
        task_id = runner.publish("chatty", None)
        assert runner.run_until_empty(timeout=30) is True
    lines = {r.getMessage(): r.__dict__[FIELDS_ATTR] for r in caplog.records
             if FIELDS_ATTR in r.__dict__}  # fmt: skip
    hello, lost = lines["hello from the child"], lines["could not find it"]
    assert hello["task_id"] == lost["task_id"] == task_id
    assert hello["event"] == "task.log" and hello["step"] == 3
    assert lost["logger"] == "shop.images"
    assert "KeyError: 'lost'" in lost["exc"]


def test_a_return_value_json_cannot_carry(tmp_path: Path) -> None:
    """Dropped when nothing reads it; a failed attempt when the type keeps results."""
    types = {
        "dropped": {"handler": f"{H}:a_set", "concurrency": 1},
        "kept": {"handler": f"{H}:a_set", "concurrency": 1, "results": {"ttl": 60}},
    }
    with build_runtime(_config("memory", tmp_path, types), observe=False) as runner:
        runner.publish("dropped", None)
        kept = runner.publish("kept", None)
        assert runner.run_until_empty(timeout=30) is True
        dead = _dead(runner)
        summary = runner.summary.to_dict()
    assert summary["by_type"]["dropped"]["succeeded"] == 1
    assert set(dead) == {kept}
    assert "not JSON" in dead[kept].message


@pytest.mark.parametrize("kind", BROKERS)
def test_stop_kills_running_children_and_hands_their_tasks_back(kind: str, tmp_path: Path) -> None:
    """Past the grace period the running children are killed and their tasks handed back
    (SQLite: queued for the next run; memory: dead-lettered as shutdown); no child is left."""
    types = {"slow": {"handler": f"{H}:note_and_sleep", "concurrency": 2, "timeout": 20}}
    recorder = Recorder()
    runner = build_runtime(_config(kind, tmp_path, types), observe=False, listeners=[recorder])
    runner.start()
    ids = runner.publish_many([("slow", {"dir": str(tmp_path), "s": 15})] * 2)
    _wait(lambda: len(list(tmp_path.glob("*.pid"))) == 2)
    children = _children(runner)
    t0 = time.monotonic()
    runner.stop(grace_s=0.3)
    assert time.monotonic() - t0 < 5
    assert not any(_alive(pid) for pid in children)
    busy = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert not any(_alive(pid) for pid in busy)
    if kind == "sqlite":
        broker = create_broker(_config(kind, tmp_path, types))
        try:
            depth = broker.depth()["slow"]
        finally:
            broker.close()
        assert (depth.ready, depth.leased) == (2, 0)
    else:
        dead = recorder.named("task.dead")
        assert {e.task_id for e in dead} == set(ids)
        assert all(e.reason == DeadReason.SHUTDOWN for e in dead)


def test_validation(tmp_path: Path) -> None:
    """timeout + kill_grace must stay below visibility_timeout; process-only keys on another
    type; an async def on a process type."""
    path = tmp_path / "p.yaml"
    path.write_text(
        "broker: {kind: sqlite, path: q.db, visibility_timeout: 10s}\n"
        "task_types:\n"
        "  long:\n"
        f"    handler: {H}:whoami\n"
        "    execution: process\n"
        "    timeout: 9s\n"
        "    kill_grace: 2s\n"
        "  plain:\n"
        f"    handler: {H}:whoami\n"
        "    max_tasks_per_child: 3\n"
        "  coro:\n"
        f"    handler: {H}:not_here\n"
        "    execution: process\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value)
    assert "task_types.long.timeout" in lines and "plus kill_grace (2s)" in lines
    assert "task_types.plain.max_tasks_per_child" in lines and "execution: process" in lines
    assert "task_types.coro.handler" in lines and "async def" in lines


@pytest.mark.parametrize("kind", BROKERS)
def test_wrapping_middlewares_run_in_the_child(kind: str, tmp_path: Path) -> None:
    """The simulator wraps the handler in the child: its fault plans (a failed first attempt,
    a poison payload) are raised there, and the summary counts them like any failure."""
    types = {"work": {"handler": f"{H}:whoami", "concurrency": 1,
                      "retry": {"max_attempts": 2, "backoff": {"initial": 0.01}}}}  # fmt: skip
    config = _config(kind, tmp_path, types, results={"ttl": 60})
    with build_runtime(config, observe=False) as runner:
        flaky = runner.publish("work", {"n": 1}, headers={SIM_HEADER: {"fail_attempts": 1}})
        poison = runner.publish("work", {"n": 2}, headers={SIM_HEADER: {"poison": True, "n": 2}})
        assert runner.run_until_empty(timeout=30) is True
        dead = _dead(runner)
        result = runner.result(flaky)
        summary = runner.summary.to_dict()
    assert result is not None and result["value"]["pid"] != os.getpid()
    assert summary["by_type"]["work"]["retried"] == 2
    assert set(dead) == {poison}
    assert dead[poison].error_type == "PoisonPayload"
    assert "simulate.py" in dead[poison].traceback
