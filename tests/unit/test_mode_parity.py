"""The three execution modes behind one config end tasks the same way: the same handler
behaviours (return a value, raise a never_retry error, fail once then succeed, always fail,
raise PermanentError, run past the timeout, return what JSON cannot carry), run as thread,
async and process types, give the same outcome, kept result, dead-letter record and counts,
on SQLite (and on memory and Redis in `make test-slow`). Only a process type's timeout says
more: its child was killed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runner import PipelineConfig, build_runtime
from runner.brokers.base import DeadLetterFilter

H = "tests.unit.parity_handlers"
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = "ran past its timeout of 0.5s"
NOT_JSON = "the handler's return value is not JSON: Object of type set is not JSON serializable"

#: behaviour -> (its kept result, its dead letter: reason, error type, message, attempts)
EXPECTED: dict[str, tuple[dict[str, Any], tuple[str, str, str, int] | None]] = {
    "ok": ({"state": "succeeded", "value": {"got": 1, "attempt": 1}}, None),
    "refuse": (
        {"state": "dead", "reason": "never_retry", "error": "ValueError: bad input 1"},
        ("never_retry", "ValueError", "bad input 1", 1),
    ),
    "flaky": ({"state": "succeeded", "value": "fine"}, None),
    "broken": (
        {"state": "dead", "reason": "exhausted", "error": "RuntimeError: always"},
        ("exhausted", "RuntimeError", "always", 2),
    ),
    "permanent": (
        {"state": "dead", "reason": "permanent", "error": "PermanentError: never will"},
        ("permanent", "PermanentError", "never will", 1),
    ),
    "slow": (
        {"state": "dead", "reason": "exhausted", "error": f"TimeoutError: {TIMEOUT}"},
        ("exhausted", "TimeoutError", TIMEOUT, 2),
    ),
    "not_json": (
        {"state": "dead", "reason": "permanent", "error": f"PermanentError: {NOT_JSON}"},
        ("permanent", "PermanentError", NOT_JSON, 1),
    ),
}
#: behaviour -> its counts in the summary
COUNTS = {
    "ok": {"published": 1, "started": 1, "succeeded": 1},
    "refuse": {"published": 1, "started": 1, "dead": 1},
    "flaky": {"published": 1, "started": 2, "retrying": 1, "succeeded": 1},
    "broken": {"published": 1, "started": 2, "retrying": 1, "dead": 1},
    "permanent": {"published": 1, "started": 1, "dead": 1},
    "slow": {"published": 1, "started": 2, "retrying": 1, "dead": 1, "timeout": 2},
    "not_json": {"published": 1, "started": 1, "dead": 1},
}


def _broker(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "sqlite":
        return {"kind": "sqlite", "path": str(tmp_path / "q.db")}
    if kind == "redis":
        server = request.getfixturevalue("redis_server")  # skips without the binary
        return {"kind": "redis", "url": server.url, "namespace": request.getfixturevalue(
            "redis_namespace")}  # fmt: skip
    return {"kind": "memory"}


@pytest.mark.parametrize(
    "kind",
    ["sqlite", pytest.param("memory", marks=pytest.mark.slow),
     pytest.param("redis", marks=[pytest.mark.slow, pytest.mark.redis])],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["thread", "async", "process"])
def test_every_mode_ends_each_behaviour_the_same_way(
    mode: str, kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    types: dict[str, Any] = {}
    for behaviour in EXPECTED:
        handler = f"a{behaviour}" if mode == "async" else behaviour
        spec: dict[str, Any] = {
            "handler": f"{H}:{handler}",
            "timeout": 0.5,
            "results": {"ttl": 3600},
        }
        if mode != "thread":
            spec |= {"execution": mode, "concurrency": 2}
        types[behaviour] = spec
    config = PipelineConfig.model_validate(
        {
            "broker": _broker(kind, tmp_path, request),
            "workers": 2,
            "handler_paths": [str(ROOT)],
            "retry": {
                "max_attempts": 2,
                "backoff": {"initial": 0.01, "max": 0.02},
                "never_retry": ["ValueError"],
            },
            "task_types": types,
            "metrics": {"enabled": False},
            "logging": {"level": "ERROR"},
        }
    )
    with build_runtime(config, observe=False) as runner:
        ids = {behaviour: runner.publish(behaviour, {"n": 1}) for behaviour in EXPECTED}
        assert runner.run_until_empty(timeout=60) is True
        records = runner.broker.dead_letters(DeadLetterFilter())  # type: ignore[attr-defined]
        kept = {b: runner.result(task_id, timeout=5) for b, task_id in ids.items()}
    dead = {r.task.type: r for r in records}
    for behaviour, (result, record) in EXPECTED.items():
        got = {k: v for k, v in (kept[behaviour] or {}).items() if k != "finished_at"}
        found = dead.get(behaviour)
        seen = None if found is None else (found.reason, found.error_type, found.message,
                                           found.attempts)  # fmt: skip
        if mode == "process" and behaviour == "slow":  # a process type's says what it did
            suffix = "; its child process was killed"
            assert got["error"].endswith(suffix) and seen and seen[2].endswith(suffix)
            got["error"] = got["error"].removesuffix(suffix)
            seen = (seen[0], seen[1], seen[2].removesuffix(suffix), seen[3])
        assert (got, seen) == (result, record), behaviour
    counts = {t: dict(c) for t, c in runner.summary.counts.items()}
    for report in ("interrupted", "overrun"):  # a thread's own: its interrupt, and a C call
        counts["slow"].pop(report, None)  # (time.sleep) that the interrupt cannot stop
    assert counts == COUNTS
